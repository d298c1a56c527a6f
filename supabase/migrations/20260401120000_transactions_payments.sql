-- =============================================================================
-- Transactions, payments and wallets: idempotent, race-free money movement.
--
--   currencies                    ISO 4217 codes and their minor units
--   wallets                       one balance per user and currency, plus system
--                                 accounts (external, fees, commissions)
--   ledger_entries                double-entry ledger: every statement that
--                                 writes entries writes them balanced
--   transactions       (partitioned) the money movements and their state
--   transaction_references        global uniqueness of references, id -> month
--   transaction_idempotency_keys  Stripe-style keys, scoped per user
--   transaction_events (partitioned) every status transition
--   payment_methods               masked numbers; details encrypted, never read
--
-- Money rules live here, not in TypeScript:
--   * outgoing transactions (debit, payment, fee, transfer) hold funds when
--     created, settle on completion and release the hold on failure or
--     cancellation; incoming ones (credit, refund, commission) move money from
--     a system account when completed; a reversal writes compensating entries;
--   * an overdraft is `insufficient_funds` (409) and changes nothing;
--   * wallets are locked in id order, so concurrent transfers never deadlock;
--   * users move only their own money out; only the service role brings money
--     in, changes statuses or reverses.
-- =============================================================================

-- -----------------------------------------------------------------------------
-- currencies
-- -----------------------------------------------------------------------------
create table public.currencies (
  code text primary key check (code ~ '^[A-Z]{3}$'),
  name text not null check (char_length(name) between 1 and 64),
  minor_unit smallint not null check (minor_unit between 0 and 4),
  created_at timestamptz not null default now()
);

insert into public.currencies (code, name, minor_unit) values
  ('RWF', 'Rwandan franc', 0),
  ('USD', 'US dollar', 2),
  ('EUR', 'Euro', 2),
  ('GBP', 'Pound sterling', 2),
  ('KES', 'Kenyan shilling', 2),
  ('UGX', 'Ugandan shilling', 0),
  ('TZS', 'Tanzanian shilling', 2),
  ('BIF', 'Burundian franc', 0),
  ('CDF', 'Congolese franc', 2),
  ('XOF', 'West African CFA franc', 0),
  ('JPY', 'Japanese yen', 0),
  ('BHD', 'Bahraini dinar', 3);

alter table public.currencies enable row level security;
revoke all on public.currencies from anon, authenticated, service_role;
grant select on public.currencies to authenticated, service_role;

create policy currencies_user_select on public.currencies
  for select to authenticated using (true);
create policy currencies_service_select on public.currencies
  for select to service_role using (true);

-- -----------------------------------------------------------------------------
-- Secrets for payment method details (pgcrypto symmetric key). Only the
-- migration owner reads this table; on a hosted project, keep the key in
-- Supabase Vault and change private.payment_details_key() to read it there.
-- -----------------------------------------------------------------------------
create table private.transaction_secrets (
  name text primary key,
  value text not null
);
alter table private.transaction_secrets enable row level security;
revoke all on private.transaction_secrets from public, anon, authenticated, service_role;

insert into private.transaction_secrets (name, value)
values ('payment_details_key', encode(extensions.gen_random_bytes(32), 'hex'))
on conflict (name) do nothing;

create or replace function private.payment_details_key() returns text
language sql
stable
set search_path = ''
as $$
  select value from private.transaction_secrets where name = 'payment_details_key'
$$;

-- Hot-path helpers below carry no `set search_path`: a SET clause costs a
-- GUC save/restore on every call and stops SQL functions from being inlined.
-- They run only inside this migration's security definer functions (which
-- pin search_path to '') or its triggers, are executable by no API role, and
-- qualify every name.

-- The caller: private.caller_role() / private.require_caller() (foundation).

-- Time-ordered UUIDs (version 7: 48-bit Unix milliseconds, then random).
-- Ids and references of new transactions land at the right edge of their
-- indexes instead of on random pages, which keeps WAL (full-page writes)
-- and buffer churn per insert low.
create or replace function private.uuid_v7() returns uuid
language sql
volatile
as $$
  select encode(
    set_bit(set_bit(
      overlay(uuid_send(gen_random_uuid())
        placing substring(int8send(floor(extract(epoch from clock_timestamp()) * 1000)::bigint) from 3)
        from 1 for 6),
      52, 1), 53, 1),
    'hex')::uuid
$$;


-- -----------------------------------------------------------------------------
-- Single-column rules as domains. Postgres reads a table's CHECK constraints
-- back from the catalogue and plans them again for every INSERT or UPDATE
-- statement; a domain's checks are prepared once per connection. The three on
-- transactions cost 132,000 of a credit's 988,000 instructions as CHECKs.
-- Rules over several columns stay table CHECKs.
-- -----------------------------------------------------------------------------
create domain private.wallet_kind as text check (value in ('user', 'system'));
create domain private.system_wallet_code as text
  check (value in ('external', 'fees', 'commissions'));
create domain private.transaction_type as text
  check (value in ('debit', 'credit', 'transfer', 'payment', 'refund', 'fee', 'commission'));
create domain private.transaction_status as text
  check (value in ('pending', 'processing', 'completed', 'failed', 'cancelled', 'reversed'));
create domain private.positive_amount as numeric check (value > 0);
create domain private.ledger_amount as numeric check (value <> 0);
create domain private.ledger_entry_type as text check (value in ('settlement', 'reversal'));

-- -----------------------------------------------------------------------------
-- wallets: a user's balance per currency, and the system accounts money comes
-- from and goes to. held is what pending outgoing transactions reserve;
-- available = balance - held never goes below zero for users.
-- -----------------------------------------------------------------------------
create table public.wallets (
  id uuid primary key default gen_random_uuid(),
  kind private.wallet_kind not null,
  user_id uuid references auth.users (id) on delete restrict,
  system_code private.system_wallet_code,
  currency text not null references public.currencies (code),
  balance numeric not null default 0,
  held numeric not null default 0,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint wallets_owner check (
    (kind = 'user' and user_id is not null and system_code is null)
    or (kind = 'system' and user_id is null and system_code is not null)
  ),
  constraint wallets_user_funds check (kind = 'system' or (held >= 0 and balance >= held)),
  constraint wallets_user_currency_key unique (user_id, currency),
  constraint wallets_system_currency_key unique (system_code, currency)
);

alter table public.wallets enable row level security;
revoke all on public.wallets from anon, authenticated, service_role;
grant select on public.wallets to authenticated, service_role;

create policy wallets_user_select on public.wallets
  for select to authenticated using (user_id = (select auth.uid()));
create policy wallets_service_select on public.wallets
  for select to service_role using (true);

-- The wallet of a user or system account, created on first use. Wallets are
-- created in one order per pair (see private.ensure_wallets), so first-time
-- creation cannot deadlock either.
create or replace function private.ensure_wallet(
  p_user_id uuid,
  p_system_code text,
  p_currency text
) returns uuid
language plpgsql
as $$
declare
  v_id uuid;
begin
  if p_user_id is not null then
    select w.id into v_id from public.wallets w where w.user_id = p_user_id and w.currency = p_currency;
  else
    select w.id into v_id from public.wallets w where w.system_code = p_system_code and w.currency = p_currency;
  end if;
  if v_id is not null then
    return v_id;
  end if;
  if p_user_id is not null and not exists (select from auth.users u where u.id = p_user_id) then
    perform private.raise_error(404, 'user_not_found', 'no such user',
      jsonb_build_object('user_id', p_user_id));
  end if;
  insert into public.wallets (kind, user_id, system_code, currency)
  values (case when p_user_id is null then 'system' else 'user' end, p_user_id, p_system_code, p_currency)
  on conflict do nothing
  returning id into v_id;
  if v_id is null then
    -- a concurrent first use created it
    select w.id into v_id from public.wallets w
    where w.currency = p_currency
      and (w.user_id = p_user_id or (p_user_id is null and w.system_code = p_system_code));
  end if;
  return v_id;
end;
$$;

-- -----------------------------------------------------------------------------
-- ledger_entries: append-only, balanced per statement, transaction and currency.
-- -----------------------------------------------------------------------------
create table public.ledger_entries (
  id bigserial primary key,
  transaction_id uuid not null,
  -- no foreign key: its row lock (FOR KEY SHARE) on hot wallets would turn
  -- into multixacts; the statement trigger checks wallet and currency instead
  wallet_id uuid not null,
  currency text not null,
  amount private.ledger_amount not null,
  entry_type private.ledger_entry_type not null,
  created_at timestamptz not null default now()
);

create index ledger_entries_wallet_idx on public.ledger_entries (wallet_id, id);
create index ledger_entries_transaction_idx on public.ledger_entries (transaction_id);

alter table public.ledger_entries enable row level security;
revoke all on public.ledger_entries from anon, authenticated, service_role;
revoke all on sequence public.ledger_entries_id_seq from anon, authenticated, service_role;
grant select on public.ledger_entries to service_role;

create policy ledger_entries_service_select on public.ledger_entries
  for select to service_role using (true);

create or replace function private.ledger_entries_balanced() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if exists (
    select from new_entries e
    group by e.transaction_id, e.currency
    having sum(e.amount) <> 0
  ) then
    raise exception using errcode = '23514', message = 'ledger entries must balance per transaction and currency';
  end if;
  if exists (
    select from new_entries e left join public.wallets w on w.id = e.wallet_id
    where w.id is null or w.currency <> e.currency
  ) then
    raise exception using errcode = '23514', message = 'a ledger entry needs a wallet of its currency';
  end if;
  return null;
end;
$$;

create trigger ledger_entries_balanced
  after insert on public.ledger_entries
  referencing new table as new_entries
  for each statement execute function private.ledger_entries_balanced();

create or replace function private.ledger_entries_append_only() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  raise exception using errcode = '42501', message = 'ledger entries are append-only';
end;
$$;

create trigger ledger_entries_append_only
  before update or delete on public.ledger_entries
  for each row execute function private.ledger_entries_append_only();

-- -----------------------------------------------------------------------------
-- payment_methods
-- -----------------------------------------------------------------------------
create table public.payment_methods (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  type text not null check (type in ('card', 'mobile_money', 'bank_account', 'wallet', 'cash')),
  provider text check (char_length(provider) between 1 and 64),
  account_number_masked text check (account_number_masked ~ '^\*{4}[0-9A-Za-z]{0,4}$'),
  encrypted_details bytea,
  is_default boolean not null default false,
  verification_status text not null default 'unverified'
    check (verification_status in ('unverified', 'pending', 'verified', 'failed')),
  is_verified boolean generated always as (verification_status = 'verified') stored,
  verified_at timestamptz,
  metadata jsonb not null default '{}'::jsonb check (jsonb_typeof(metadata) = 'object'),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  deleted_at timestamptz,
  constraint payment_methods_deleted_not_default check (deleted_at is null or not is_default)
);

create index payment_methods_user_idx on public.payment_methods (user_id, created_at desc);
-- at most one default per user
create unique index payment_methods_one_default_idx
  on public.payment_methods (user_id) where is_default and deleted_at is null;

create trigger payment_methods_updated_at
  before update on public.payment_methods
  for each row execute function private.set_updated_at();

-- Verification is the service role's call, whoever runs the statement.
create or replace function private.payment_methods_guard_verification() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if private.caller_role() <> 'service_role' and (
    (tg_op = 'INSERT' and (new.verification_status <> 'unverified' or new.verified_at is not null))
    or (tg_op = 'UPDATE' and (new.verification_status is distinct from old.verification_status
                              or new.verified_at is distinct from old.verified_at))
  ) then
    perform private.raise_error(403, 'forbidden', 'only the service role verifies payment methods');
  end if;
  return new;
end;
$$;

create trigger payment_methods_guard_verification
  before insert or update on public.payment_methods
  for each row execute function private.payment_methods_guard_verification();

alter table public.payment_methods enable row level security;
revoke all on public.payment_methods from anon, authenticated, service_role;
-- Column privileges: encrypted_details is readable by no API role.
grant select (id, user_id, type, provider, account_number_masked, is_default, verification_status,
              is_verified, verified_at, metadata, created_at, updated_at, deleted_at)
  on public.payment_methods to authenticated, service_role;

create policy payment_methods_user_select on public.payment_methods
  for select to authenticated using (user_id = (select auth.uid()));
create policy payment_methods_service_select on public.payment_methods
  for select to service_role using (true);

-- What clients see of a payment method (and the row type the functions return).
create view public.user_payment_methods with (security_invoker = true) as
select id, user_id, type, provider, account_number_masked, is_default, verification_status,
       is_verified, verified_at, metadata, created_at, updated_at
from public.payment_methods
where deleted_at is null;

revoke all on public.user_payment_methods from anon, authenticated, service_role;
grant select on public.user_payment_methods to authenticated, service_role;

-- -----------------------------------------------------------------------------
-- transactions (partitioned)
-- -----------------------------------------------------------------------------
-- Only the functions below write here, and they validate every field (400s
-- with stable codes). The table keeps the invariants money depends on, in
-- domains and CHECKs; length and format rules live in the functions.
create table public.transactions (
  id uuid not null default private.uuid_v7(),
  reference text not null,
  user_id uuid not null,
  type private.transaction_type not null,
  category text,
  amount private.positive_amount not null,
  currency text not null,
  status private.transaction_status not null default 'pending',
  payment_method_id uuid references public.payment_methods (id),
  source_wallet_id uuid not null,
  destination_wallet_id uuid not null,
  destination_user_id uuid,
  description text,
  metadata jsonb not null default '{}'::jsonb,
  correlation_id text,
  idempotency_key text,
  -- who created it: the user's id, or 'service_role'
  created_by text not null,
  error_code text,
  error_message text,
  initiated_at timestamptz not null default now(),
  processing_at timestamptz,
  completed_at timestamptz,
  failed_at timestamptz,
  cancelled_at timestamptz,
  reversed_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  primary key (id, created_at),
  constraint transactions_destination check (
    case when type = 'transfer' then destination_user_id is not null and destination_user_id <> user_id
         else destination_user_id is null end
  )
) partition by range (created_at);

create index transactions_user_created_idx
  on public.transactions (user_id, created_at desc, id desc);
create index transactions_destination_created_idx
  on public.transactions (destination_user_id, created_at desc, id desc)
  where destination_user_id is not null;
create index transactions_created_idx on public.transactions (created_at desc, id desc);
-- Deliberately no index on status (it would make every status change a
-- non-HOT update) nor on correlation_id (every API call sets one): each index
-- costs WAL on the hottest insert path. Operators filter status over
-- transactions_created_idx; tracing by correlation id goes through logs.

-- Money records are never detached by retention.
select private.register_partitioned_table('public', 'transactions', 3, null);

alter table public.transactions enable row level security;
revoke all on public.transactions from anon, authenticated, service_role;
grant select on public.transactions to authenticated, service_role;

-- A user reads what they initiated and transfers they received.
create policy transactions_user_select on public.transactions
  for select to authenticated
  using (user_id = (select auth.uid()) or destination_user_id = (select auth.uid()));
create policy transactions_service_select on public.transactions
  for select to service_role using (true);

-- -----------------------------------------------------------------------------
-- transaction_references: references are unique across partitions, and the
-- id -> created_at map lets lookups by id prune to one partition.
-- -----------------------------------------------------------------------------
create table public.transaction_references (
  reference text primary key,
  transaction_id uuid not null unique,
  user_id uuid not null,
  created_at timestamptz not null
);

alter table public.transaction_references enable row level security;
revoke all on public.transaction_references from anon, authenticated, service_role;
grant select on public.transaction_references to service_role;

create policy transaction_references_service_select on public.transaction_references
  for select to service_role using (true);

-- created_at of a transaction id (a timestamp only; RLS still decides who reads the row).
create or replace function private.transaction_created_at(p_transaction_id uuid)
returns timestamptz
language sql
stable
security definer
set search_path = ''
as $$
  select r.created_at from public.transaction_references r where r.transaction_id = p_transaction_id
$$;
grant execute on function private.transaction_created_at(uuid) to authenticated, service_role;

-- -----------------------------------------------------------------------------
-- transaction_idempotency_keys: one row per (user, key); kept >= 24 hours.
-- -----------------------------------------------------------------------------
create table public.transaction_idempotency_keys (
  user_id uuid not null,
  idempotency_key text not null,
  request_hash text not null,
  transaction_id uuid not null,
  transaction_created_at timestamptz not null,
  created_at timestamptz not null default now(),
  primary key (user_id, idempotency_key)
);

-- Keys arrive in time order: a BRIN index serves the purge at almost no cost per insert.
create index transaction_idempotency_keys_created_idx
  on public.transaction_idempotency_keys using brin (created_at);

alter table public.transaction_idempotency_keys enable row level security;
revoke all on public.transaction_idempotency_keys from anon, authenticated, service_role;
grant select on public.transaction_idempotency_keys to service_role;

create policy transaction_idempotency_keys_service_select on public.transaction_idempotency_keys
  for select to service_role using (true);

-- -----------------------------------------------------------------------------
-- transaction_events (partitioned)
-- -----------------------------------------------------------------------------
-- user_id and destination_user_id are the transaction's (fixed at creation):
-- who may read its history, checked on the event row itself.
create table public.transaction_events (
  id bigserial not null,
  transaction_id uuid not null,
  user_id uuid not null,
  destination_user_id uuid,
  previous_status text,
  new_status text not null,
  actor_role text not null,
  actor_id text,
  reason text,
  correlation_id text,
  metadata jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now(),
  -- leads with transaction_id: the one lookup events serve, without a second index
  primary key (transaction_id, created_at, id)
) partition by range (created_at);

create index transaction_events_user_idx
  on public.transaction_events (user_id, created_at desc);
create index transaction_events_destination_idx
  on public.transaction_events (destination_user_id, created_at desc)
  where destination_user_id is not null;

select private.register_partitioned_table('public', 'transaction_events', 3, null);

alter table public.transaction_events enable row level security;
revoke all on public.transaction_events from anon, authenticated, service_role;
revoke all on sequence public.transaction_events_id_seq from anon, authenticated, service_role;
grant select on public.transaction_events to authenticated, service_role;

-- A user reads the history of every transaction they can read: their own, and
-- transfers they received; the same rule as the transactions policy.
create policy transaction_events_user_select on public.transaction_events
  for select to authenticated using (
    user_id = (select auth.uid()) or destination_user_id = (select auth.uid())
  );
create policy transaction_events_service_select on public.transaction_events
  for select to service_role using (true);

-- -----------------------------------------------------------------------------
-- Outgoing types: the user's money leaves their wallet, so it is held from
-- creation until it completes (or is released), and users may create them.
-- -----------------------------------------------------------------------------
-- Whether a user may receive money: they exist and are not (soft) deleted.
-- Null (a system account receives) is live. A plain read: enough where
-- nothing is paid yet (a pending credit or transfer), as its completion
-- checks again, with private.lock_live_user.
create or replace function private.user_is_live(p_user_id uuid) returns boolean
language sql
stable
as $$
  select p_user_id is null
      or exists (select from auth.users u where u.id = p_user_id and u.deleted_at is null)
$$;

-- The same check where money is paid (an immediate transfer, a completion, a
-- reversal). A plain read would not do: a payment checks its payee long
-- before it can lock the wallets (it may queue behind other payments there),
-- and a deletion committing in between would be paid all the same. So the check share-locks
-- the payee's auth.users row until commit, and it orders payment and deletion
-- either way:
--   - a deletion (soft: an UPDATE of deleted_at, which takes FOR NO KEY
--     UPDATE; or hard: a DELETE, FOR UPDATE) that comes later waits for the
--     payment, which pays a live account; FOR SHARE, not FOR KEY SHARE, since
--     KEY SHARE does not conflict with an UPDATE of a non-key column;
--   - a deletion already under way makes the check wait for it; once it
--     commits, the lock re-reads the newest row (read committed), finds it
--     deleted or gone, and the payment is refused having paid no one.
-- Lock order: the payee's auth.users row, then the wallets (in id order).
-- Payments share-lock only, so they never wait on each other here; a
-- deletion that then moves the account's money (deletion first, then its
-- balance) takes the same order, and cannot deadlock with a payment. The lock
-- is held through the wallet wait, so an update of that auth.users row (a
-- deletion, GoTrue's sign-in bookkeeping) waits for the payments in flight to
-- it: milliseconds, as long as the payment itself.
-- Volatile: a locking read is not allowed in a stable function.
create or replace function private.lock_live_user(p_user_id uuid) returns boolean
language sql
volatile
set search_path = ''
as $$
  select p_user_id is null
      or exists (select from auth.users u where u.id = p_user_id and u.deleted_at is null
                 for share of u)
$$;

create or replace function private.is_outgoing(p_type text) returns boolean
language sql
immutable
as $$
  select p_type in ('debit', 'payment', 'fee', 'transfer')
$$;

-- -----------------------------------------------------------------------------
-- Money movement
--
-- p_phase:
--   hold          outgoing created: reserve the amount on the source wallet
--   release       outgoing failed or cancelled: drop the reservation
--   settle        completion: source pays (from its hold when outgoing),
--                 destination receives, two balanced entries
--   settle_direct immediate transfer: like settle without a prior hold
--   reverse       reversal of a completed one: the destination pays back
-- Both wallets are locked in id order before either changes, so movements
-- over the same wallets serialise instead of deadlocking. A user wallet
-- without the funds raises insufficient_funds; the caller's transaction
-- then rolls back whole.
-- -----------------------------------------------------------------------------
create or replace function private.move_funds(p_tx public.transactions, p_phase text)
returns void
language plpgsql
as $$
declare
  v_payer uuid;
  v_payee uuid;
  v_payee_user uuid;
  v_from_hold boolean := p_phase = 'settle' and private.is_outgoing(p_tx.type);
  v_rows integer;
begin
  if p_phase = 'hold' then
    update public.wallets
    set held = held + p_tx.amount, updated_at = now()
    where id = p_tx.source_wallet_id and balance - held >= p_tx.amount;
    if not found then
      perform private.raise_error(409, 'insufficient_funds', 'the wallet does not hold enough funds',
        jsonb_build_object('currency', p_tx.currency, 'amount', p_tx.amount::text));
    end if;
    return;
  elsif p_phase = 'release' then
    update public.wallets
    set held = held - p_tx.amount, updated_at = now()
    where id = p_tx.source_wallet_id;
    return;
  end if;

  if p_phase = 'reverse' then
    v_payer := p_tx.destination_wallet_id;
    v_payee := p_tx.source_wallet_id;
  else
    v_payer := p_tx.source_wallet_id;
    v_payee := p_tx.destination_wallet_id;
  end if;

  -- A deleted account receives nothing. settle_direct pays whom
  -- create_transaction has just checked (and share-locked); a settlement or a
  -- reversal comes later, when the payee may have left: the transaction is
  -- then failed or cancelled instead (which releases a hold), or stays
  -- completed. Checked under the payee's share lock, before the wallets (see
  -- private.lock_live_user).
  if p_phase <> 'settle_direct' then
    select w.user_id into v_payee_user from public.wallets w where w.id = v_payee;
    if not private.lock_live_user(v_payee_user) then
      perform private.raise_error(409, 'recipient_deleted',
        'the account this would pay has been deleted',
        jsonb_build_object('user_id', v_payee_user));
    end if;
  end if;

  -- Entries first: they take no wallet lock.
  insert into public.ledger_entries (transaction_id, wallet_id, currency, amount, entry_type)
  values
    (p_tx.id, v_payer, p_tx.currency, -p_tx.amount,
     case when p_phase = 'reverse' then 'reversal' else 'settlement' end),
    (p_tx.id, v_payee, p_tx.currency, p_tx.amount,
     case when p_phase = 'reverse' then 'reversal' else 'settlement' end);

  -- Both wallets are locked in id order (LockRows runs above the sort)
  -- before either changes: movements over the same wallets queue up instead
  -- of deadlocking. This comes last, so the locks are held only for the
  -- update below and the commit.
  perform from public.wallets w
  where w.id in (v_payer, v_payee)
  order by w.id
  for no key update;

  update public.wallets w
  set balance = w.balance + case when w.id = v_payee then p_tx.amount else -p_tx.amount end,
      held = w.held - case when w.id = v_payer and v_from_hold then p_tx.amount else 0 end,
      updated_at = now()
  where w.id in (v_payer, v_payee)
    and (w.id = v_payee or w.kind = 'system' or v_from_hold or w.balance - w.held >= p_tx.amount);
  get diagnostics v_rows = row_count;
  if v_rows <> 2 then
    -- the amount as text, as the API gives amounts: a JSON number loses cents past 2^53
    perform private.raise_error(409, 'insufficient_funds', 'the wallet does not hold enough funds',
      jsonb_build_object('currency', p_tx.currency, 'amount', p_tx.amount::text));
  end if;
end;
$$;

-- -----------------------------------------------------------------------------
-- Creating a transaction (shared by create_transaction and transfer_funds)
--
-- p_user_id is already resolved by private.acting_user, which never answers
-- null; p_created_by is the caller as created_by records it (the user's id,
-- or 'service_role'), worked out by the public function that knows it (the
-- insert asking caller_is_service() itself cost 18,000 of a credit's 990,000
-- instructions: every function in a statement is set up at each execution).
--
-- Idempotency as Stripe defines it: the first call with a key stores the key
-- with a hash of its parameters in the same database transaction as the
-- money movement. A concurrent call with the same key waits on that row's
-- insert and then finds it: same hash -> the original transaction; other
-- hash -> idempotency_key_reused (409). A call that fails stores nothing, so
-- it may be retried with the same key. The hash covers the recipient as the
-- caller named it (p_recipient: transfer_funds' id or phone), so a retry
-- replays even after the phone has passed to someone else (the sender
-- included); the recipient is checked only after that, so a retry replays
-- even if they have left since.
-- -----------------------------------------------------------------------------
create or replace function private.create_transaction(
  p_user_id uuid,
  p_type text,
  p_amount numeric,
  p_currency text,
  p_idempotency_key text,
  p_category text,
  p_description text,
  p_metadata jsonb,
  p_correlation_id text,
  p_destination_user_id uuid,
  p_payment_method_id uuid,
  p_created_at timestamptz,
  p_settle boolean,
  p_created_by text,
  p_recipient jsonb default null
) returns public.transactions
language plpgsql
as $$
declare
  v_minor smallint;
  v_amount numeric;
  v_hash text;
  v_id uuid := private.uuid_v7();
  v_created_at timestamptz := coalesce(p_created_at, now());
  v_key public.transaction_idempotency_keys;
  v_outgoing boolean := private.is_outgoing(p_type);
  v_system text;
  v_user_wallet uuid;
  v_other_wallet uuid;
  v_reference text;
  v_tx public.transactions;
begin
  if p_type is null or p_type not in ('debit', 'credit', 'transfer', 'payment', 'refund', 'fee', 'commission') then
    perform private.raise_error(400, 'invalid_type',
      'type must be one of debit, credit, transfer, payment, refund, fee, commission');
  end if;
  select c.minor_unit into v_minor from public.currencies c where c.code = p_currency;
  if v_minor is null then
    perform private.raise_error(400, 'invalid_currency', 'currency must be a supported ISO 4217 code',
      jsonb_build_object('currency', p_currency));
  end if;
  if p_amount is null or p_amount <= 0 or p_amount >= 1e15 then
    perform private.raise_error(400, 'invalid_amount', 'amount must be positive');
  end if;
  v_amount := round(p_amount, v_minor);
  if v_amount <> p_amount then
    perform private.raise_error(400, 'invalid_amount_precision',
      format('%s amounts have %s decimal places at most', p_currency, v_minor),
      jsonb_build_object('currency', p_currency, 'minor_unit', v_minor));
  end if;
  if p_type = 'transfer' and p_destination_user_id is null then
    perform private.raise_error(400, 'destination_required', 'a transfer needs a destination user');
  elsif p_type <> 'transfer' and p_destination_user_id is not null then
    perform private.raise_error(400, 'unexpected_destination', 'only transfers have a destination user');
  end if;
  if p_metadata is not null and jsonb_typeof(p_metadata) <> 'object' then
    perform private.raise_error(400, 'invalid_metadata', 'metadata must be a JSON object');
  end if;
  -- Postgres writes a year past 9999, before 1000 or BC with other than four
  -- digits, which the API's list cursors (and maintenance) do not take
  if p_created_at is not null and (not isfinite(p_created_at)
      or extract(year from p_created_at at time zone 'UTC') not between 1000 and 9999) then
    perform private.raise_error(400, 'invalid_created_at',
      'created_at must fall in the years 1000 to 9999 (UTC)');
  end if;
  if p_idempotency_key is not null and char_length(p_idempotency_key) not between 1 and 255 then
    perform private.raise_error(400, 'invalid_idempotency_key', 'idempotency keys have 1 to 255 characters');
  end if;
  if char_length(p_category) not between 1 and 64 or char_length(p_description) > 1000
     or char_length(p_correlation_id) > 128 then
    perform private.raise_error(400, 'invalid_input',
      'category has 1 to 64 characters, description at most 1000, correlation_id at most 128');
  end if;

  if p_idempotency_key is not null then
    -- created_at as a UTC time: a timestamptz turns into JSON text in the
    -- session's time zone, so the same instant from another zone would not match
    v_hash := md5(jsonb_build_array(
      p_settle, p_type, v_amount, p_currency,
      coalesce(p_recipient, to_jsonb(p_destination_user_id)), p_payment_method_id,
      p_category, p_description, coalesce(p_metadata, '{}'::jsonb), p_created_at at time zone 'UTC'
    )::text);
    -- An earlier call's key comes back from the insert itself, locked: a
    -- read after a DO NOTHING could find it purged (a day old) in between.
    insert into public.transaction_idempotency_keys as k
      (user_id, idempotency_key, request_hash, transaction_id, transaction_created_at)
    values (p_user_id, p_idempotency_key, v_hash, v_id, v_created_at)
    on conflict (user_id, idempotency_key) do update set request_hash = k.request_hash
    returning k.* into v_key;
    if v_key.transaction_id <> v_id then
      if v_key.request_hash <> v_hash then
        perform private.raise_error(409, 'idempotency_key_reused',
          'this idempotency key was used with other parameters',
          jsonb_build_object('transaction_id', v_key.transaction_id));
      end if;
      select t.* into v_tx from public.transactions t
      where t.id = v_key.transaction_id and t.created_at = v_key.transaction_created_at;
      return v_tx;
    end if;
  end if;

  -- after the replay: the phone a retry names may have passed to the sender
  if p_destination_user_id = p_user_id then
    perform private.raise_error(400, 'self_transfer', 'a transfer needs another user as destination');
  end if;
  -- a deleted account receives nothing (nor does one that never existed):
  -- not a transfer, nor a credit, refund or commission. An immediate
  -- transfer (p_settle) pays now: checked under the recipient's share lock,
  -- before the wallets are created or locked (see private.lock_live_user),
  -- by id, or by the id its phone resolved to. A pending one pays nothing
  -- yet: a plain read, and its completion checks under the lock.
  if p_destination_user_id is not null then
    if not (case when p_settle then private.lock_live_user(p_destination_user_id)
                 else private.user_is_live(p_destination_user_id) end) then
      perform private.raise_error(404, 'recipient_not_found', 'no user with that id or phone');
    end if;
  elsif not v_outgoing and not private.user_is_live(p_user_id) then
    perform private.raise_error(404, 'user_not_found', 'no such user',
      jsonb_build_object('user_id', p_user_id));
  end if;

  -- The method is share-locked until commit: a removal racing this either
  -- committed first (the re-check under the lock finds it gone: 404) or
  -- waits, and then removes a method that already has this transaction.
  if p_payment_method_id is not null then
    perform from public.payment_methods pm
    where pm.id = p_payment_method_id and pm.user_id = p_user_id and pm.deleted_at is null
    for share;
    if not found then
      perform private.raise_error(404, 'payment_method_not_found', 'no such payment method for this user');
    end if;
  end if;

  -- Wallets, created on first use in a fixed order (system accounts first,
  -- then users by id) so concurrent first uses cannot deadlock.
  v_system := case p_type
    when 'fee' then 'fees'
    when 'commission' then 'commissions'
    when 'transfer' then null
    else 'external'
  end;
  if v_system is not null then
    v_other_wallet := private.ensure_wallet(null, v_system, p_currency);
    v_user_wallet := private.ensure_wallet(p_user_id, null, p_currency);
  elsif p_user_id < p_destination_user_id then
    v_user_wallet := private.ensure_wallet(p_user_id, null, p_currency);
    v_other_wallet := private.ensure_wallet(p_destination_user_id, null, p_currency);
  else
    v_other_wallet := private.ensure_wallet(p_destination_user_id, null, p_currency);
    v_user_wallet := private.ensure_wallet(p_user_id, null, p_currency);
  end if;

  -- TX-<date>-<ms of the day: 7 hex><36 random bits: 9 hex>: readable and
  -- increasing within a day, like the ids. Two references clash only if two
  -- transactions share the millisecond and 36 random bits (at 10,000 per
  -- second, once in decades); the primary key then refuses the second one,
  -- which writes nothing and can be retried with the same idempotency key.
  v_reference := 'TX-' || to_char(v_created_at at time zone 'UTC', 'YYMMDD') || '-'
    || lpad(upper(to_hex((floor(extract(epoch from clock_timestamp()) * 1000)::bigint % 86400000)::int)), 7, '0')
    || upper(substr(replace(gen_random_uuid()::text, '-', ''), 1, 9));
  insert into public.transaction_references (reference, transaction_id, user_id, created_at)
  values (v_reference, v_id, p_user_id, v_created_at);

  insert into public.transactions (
    id, reference, user_id, type, category, amount, currency, status, payment_method_id,
    source_wallet_id, destination_wallet_id, destination_user_id, description, metadata,
    correlation_id, idempotency_key, created_by, initiated_at, completed_at, created_at, updated_at
  ) values (
    v_id, v_reference, p_user_id, p_type, p_category, v_amount, p_currency,
    case when p_settle then 'completed' else 'pending' end, p_payment_method_id,
    case when v_outgoing then v_user_wallet else v_other_wallet end,
    case when v_outgoing then v_other_wallet else v_user_wallet end,
    p_destination_user_id, p_description, coalesce(p_metadata, '{}'::jsonb),
    p_correlation_id, p_idempotency_key,
    p_created_by,
    now(), case when p_settle then now() end, v_created_at, now()
  )
  returning * into v_tx;
  -- No event: creation is not a transition (created_by, initiated_at and the
  -- status say who created it, when, and how it started).

  -- Wallet locks come last: they are held until commit.
  if p_settle then
    perform private.move_funds(v_tx, 'settle_direct');
  elsif v_outgoing then
    perform private.move_funds(v_tx, 'hold');
  end if;
  return v_tx;
end;
$$;

-- -----------------------------------------------------------------------------
-- public.create_transaction
--
-- Users create only their own debits, payments, fees and transfers (all of
-- which spend their money); credits, refunds and commissions, and any
-- backdating with p_created_at, are the service role's.
-- -----------------------------------------------------------------------------
create or replace function public.create_transaction(
  p_user_id uuid,
  p_type text,
  p_amount numeric,
  p_currency text,
  p_idempotency_key text default null,
  p_category text default null,
  p_description text default null,
  p_metadata jsonb default '{}'::jsonb,
  p_correlation_id text default null,
  p_destination_user_id uuid default null,
  p_payment_method_id uuid default null,
  p_created_at timestamptz default null
) returns public.transactions
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_user uuid := private.acting_user(p_user_id, 'user_id');
  -- acting_user refused anon: the caller is a user (acting for themselves) or
  -- the service role
  v_by_user boolean := not private.caller_is_service();
begin
  if v_by_user then
    if not private.is_outgoing(p_type) then
      perform private.raise_error(403, 'type_not_allowed',
        'users may create only debits, payments, fees and transfers',
        jsonb_build_object('type', p_type));
    end if;
    if p_created_at is not null then
      perform private.raise_error(403, 'forbidden', 'only the service role sets created_at');
    end if;
  end if;
  return private.create_transaction(
    v_user, p_type, p_amount, p_currency, p_idempotency_key, p_category, p_description,
    p_metadata, p_correlation_id, p_destination_user_id, p_payment_method_id, p_created_at, false,
    case when v_by_user then v_user::text else 'service_role' end
  );
end;
$$;

-- -----------------------------------------------------------------------------
-- public.transfer_funds: an immediate, atomic transfer between two users'
-- wallets (recipient by id or by auth.users.phone). Completed on return.
-- -----------------------------------------------------------------------------
create or replace function public.transfer_funds(
  p_amount numeric,
  p_currency text,
  p_to_user_id uuid default null,
  p_to_phone text default null,
  p_from_user_id uuid default null,
  p_idempotency_key text default null,
  p_description text default null,
  p_metadata jsonb default '{}'::jsonb,
  p_correlation_id text default null
) returns public.transactions
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_from uuid := private.acting_user(p_from_user_id, 'from_user_id');
  v_to uuid := p_to_user_id;
  v_matches integer;
  v_recipient jsonb;
  v_stored public.transactions;
begin
  if (p_to_user_id is null) = (p_to_phone is null) then
    perform private.raise_error(400, 'invalid_recipient', 'give exactly one of to_user_id and to_phone');
  end if;
  v_recipient := jsonb_build_object('to_user_id', p_to_user_id,
                                    'to_phone', '+' || ltrim(p_to_phone, '+'));
  if p_to_phone is not null then
    if p_to_phone !~ '^\+?[1-9][0-9]{6,14}$' then
      perform private.raise_error(400, 'invalid_phone', 'to_phone must be an E.164 number');
    end if;
    -- auth.users stores phones without the leading + (and maybe, imported,
    -- with it): two users behind one number is a 409, never a guess
    select min(u.id::text)::uuid, count(*) into v_to, v_matches from auth.users u
    where u.phone in (ltrim(p_to_phone, '+'), '+' || ltrim(p_to_phone, '+'))
      and u.deleted_at is null
      -- a number its holder has not confirmed is not theirs to be paid on
      and u.phone_confirmed_at is not null;
  end if;

  -- A phone that finds no one (or two) may be a retry of a transfer stored
  -- before its holder left or the number moved: create_transaction replays
  -- it, comparing the request as sent. (A phone that now finds someone else
  -- replays the same way below; a deleted recipient named by id is checked
  -- in create_transaction after the replay.)
  if (v_to is null or v_matches > 1) and p_idempotency_key is not null then
    select t.* into v_stored
    from public.transaction_idempotency_keys k
    join public.transactions t
      on t.id = k.transaction_id and t.created_at = k.transaction_created_at
    where k.user_id = v_from and k.idempotency_key = p_idempotency_key;
    if v_stored.destination_user_id is not null then
      v_to := v_stored.destination_user_id;
      v_matches := 1;
    elsif v_stored.id is not null then
      -- the key was used for something other than a transfer
      perform private.raise_error(409, 'idempotency_key_reused',
        'this idempotency key was used with other parameters',
        jsonb_build_object('transaction_id', v_stored.id));
    end if;
  end if;
  if v_matches > 1 then
    perform private.raise_error(409, 'recipient_ambiguous',
      'more than one user has that phone number; transfer by user id');
  end if;
  if v_to is null then
    perform private.raise_error(404, 'recipient_not_found', 'no user with that id or phone');
  end if;

  return private.create_transaction(
    v_from, 'transfer', p_amount, p_currency, p_idempotency_key, null, p_description,
    p_metadata, p_correlation_id, v_to, null, null, true,
    case when private.caller_is_service() then 'service_role' else v_from::text end, v_recipient
  );
end;
$$;

-- -----------------------------------------------------------------------------
-- public.update_transaction_status: the state machine (service role).
--
--   pending -> processing -> completed | failed
--   pending | processing -> cancelled
--   completed -> reversed
-- Anything else is illegal_transition (409) and changes nothing.
-- -----------------------------------------------------------------------------
create or replace function public.update_transaction_status(
  p_transaction_id uuid,
  p_new_status text,
  p_reason text default null,
  p_error_code text default null,
  p_error_message text default null,
  p_correlation_id text default null,
  p_metadata jsonb default null
) returns public.transactions
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_created_at timestamptz;
  v_tx public.transactions;
  v_previous text;
  v_outgoing boolean;
begin
  if private.require_caller() <> 'service_role' then
    perform private.raise_error(403, 'forbidden', 'only the service role changes transaction status');
  end if;
  if p_new_status is null
     or p_new_status not in ('pending', 'processing', 'completed', 'failed', 'cancelled', 'reversed') then
    perform private.raise_error(400, 'invalid_status',
      'status must be one of pending, processing, completed, failed, cancelled, reversed');
  end if;
  if p_metadata is not null and jsonb_typeof(p_metadata) <> 'object' then
    perform private.raise_error(400, 'invalid_metadata', 'metadata must be a JSON object');
  end if;
  if char_length(p_reason) > 1000 or char_length(p_error_code) > 64 or char_length(p_error_message) > 2000
     or char_length(p_correlation_id) > 128 then
    perform private.raise_error(400, 'invalid_input',
      'reason has at most 1000 characters, error_code 64, error_message 2000, correlation_id 128');
  end if;

  select r.created_at into v_created_at
  from public.transaction_references r where r.transaction_id = p_transaction_id;
  select t.* into v_tx from public.transactions t
  where t.id = p_transaction_id and t.created_at = v_created_at
  for update;
  if v_tx.id is null then
    perform private.raise_error(404, 'not_found', 'no such transaction');
  end if;

  v_previous := v_tx.status;
  if not (
    (v_previous = 'pending' and p_new_status in ('processing', 'cancelled'))
    or (v_previous = 'processing' and p_new_status in ('completed', 'failed', 'cancelled'))
    or (v_previous = 'completed' and p_new_status = 'reversed')
  ) then
    perform private.raise_error(409, 'illegal_transition',
      format('a %s transaction cannot become %s', v_previous, p_new_status),
      jsonb_build_object('from', v_previous, 'to', p_new_status));
  end if;

  v_outgoing := private.is_outgoing(v_tx.type);
  if p_new_status = 'completed' then
    perform private.move_funds(v_tx, 'settle');
  elsif p_new_status in ('failed', 'cancelled') and v_outgoing then
    perform private.move_funds(v_tx, 'release');
  elsif p_new_status = 'reversed' then
    perform private.move_funds(v_tx, 'reverse');
  end if;

  update public.transactions t
  set status = p_new_status,
      processing_at = case when p_new_status = 'processing' then now() else t.processing_at end,
      completed_at = case when p_new_status = 'completed' then now() else t.completed_at end,
      failed_at = case when p_new_status = 'failed' then now() else t.failed_at end,
      cancelled_at = case when p_new_status = 'cancelled' then now() else t.cancelled_at end,
      reversed_at = case when p_new_status = 'reversed' then now() else t.reversed_at end,
      error_code = coalesce(p_error_code, t.error_code),
      error_message = coalesce(p_error_message, t.error_message),
      metadata = t.metadata || coalesce(p_metadata, '{}'::jsonb),
      updated_at = now()
  where t.id = v_tx.id and t.created_at = v_tx.created_at
  returning t.* into v_tx;

  insert into public.transaction_events
    (transaction_id, user_id, destination_user_id, previous_status, new_status, actor_role,
     actor_id, reason, correlation_id, metadata)
  values
    (v_tx.id, v_tx.user_id, v_tx.destination_user_id, v_previous, v_tx.status, private.caller_role(), auth.uid()::text,
     p_reason, p_correlation_id,
     case when p_error_code is null then '{}'::jsonb
          else jsonb_build_object('error_code', p_error_code) end);
  return v_tx;
end;
$$;

-- -----------------------------------------------------------------------------
-- Reads (security invoker: RLS decides)
--
-- Volatile, not stable, as they read the partitioned tables by date: a
-- stable function reads with the snapshot of the statement that called it,
-- taken before the function waits for a partition maintenance that is moving
-- a month out of DEFAULT; once the move commits, the function plans against
-- the new partition, where the moved rows are not in that snapshot, and finds
-- nothing (a transaction said 404 while it moved). A volatile function takes
-- its snapshot after that wait.
-- -----------------------------------------------------------------------------
create or replace function public.get_transaction(p_transaction_id uuid)
returns setof public.transactions
language sql
volatile
set search_path = ''
as $$
  select t.* from public.transactions t
  where t.id = p_transaction_id
    and t.created_at = private.transaction_created_at(p_transaction_id)
$$;

-- Newest first; keyset cursor (p_before_created_at, p_before_id).
create or replace function public.list_transactions(
  p_status text default null,
  p_type text default null,
  p_currency text default null,
  p_from timestamptz default null,
  p_to timestamptz default null,
  p_user_id uuid default null,
  p_limit integer default 50,
  p_before_created_at timestamptz default null,
  p_before_id uuid default null
) returns setof public.transactions
language plpgsql
volatile
set search_path = ''
as $$
begin
  perform private.check_limit(p_limit, 1000);
  if (p_before_created_at is null) <> (p_before_id is null) then
    perform private.raise_error(400, 'invalid_cursor', 'cursor needs both created_at and id');
  end if;
  if p_from is not null and p_to is not null and p_from > p_to then
    perform private.raise_error(400, 'invalid_window', 'from must not be after to');
  end if;

  return query
  select t.* from public.transactions t
  where (p_status is null or t.status = p_status)
    and (p_type is null or t.type = p_type)
    and (p_currency is null or t.currency = p_currency)
    and (p_from is null or t.created_at >= p_from)
    and (p_to is null or t.created_at < p_to)
    and (p_user_id is null or t.user_id = p_user_id or t.destination_user_id = p_user_id)
    and (p_before_created_at is null or (t.created_at, t.id) < (p_before_created_at, p_before_id))
  order by t.created_at desc, t.id desc
  limit p_limit;
end;
$$;

-- 404 when the caller cannot read the transaction, as get_transaction.
create or replace function public.list_transaction_events(p_transaction_id uuid)
returns setof public.transaction_events
language plpgsql
volatile
set search_path = ''
as $$
begin
  if not exists (select from public.get_transaction(p_transaction_id)) then
    perform private.raise_error(404, 'not_found', 'no such transaction');
  end if;
  return query
  select e.* from public.transaction_events e
  where e.transaction_id = p_transaction_id
  order by e.created_at, e.id;
end;
$$;

-- No `set search_path` on this list and list_payment_methods (security
-- invoker, every name qualified): a SET clause stops the function from being
-- inlined, and then `p_user_id is null or w.user_id = p_user_id` is planned
-- with the parameter unknown, which no index serves: every service-role call
-- read every user's wallets. Inlined, the caller's user id is a constant.
create or replace function public.get_balances(p_user_id uuid default null)
returns table (
  wallet_id uuid,
  user_id uuid,
  currency text,
  balance numeric,
  held numeric,
  available numeric,
  updated_at timestamptz
)
language sql
stable
as $$
  select w.id, w.user_id, w.currency, w.balance, w.held, w.balance - w.held, w.updated_at
  from public.wallets w
  where w.kind = 'user' and (p_user_id is null or w.user_id = p_user_id)
  order by w.user_id, w.currency
$$;

-- -----------------------------------------------------------------------------
-- Payment methods API
-- -----------------------------------------------------------------------------
create or replace function public.add_payment_method(
  p_type text,
  p_account_number text,
  p_provider text default null,
  p_details jsonb default null,
  p_is_default boolean default false,
  p_metadata jsonb default '{}'::jsonb,
  p_user_id uuid default null
) returns setof public.user_payment_methods
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_user uuid := private.acting_user(p_user_id, 'user_id');
  v_clean text;
  v_id uuid;
  v_default boolean;
begin
  if p_type is null or p_type not in ('card', 'mobile_money', 'bank_account', 'wallet', 'cash') then
    perform private.raise_error(400, 'invalid_type',
      'type must be one of card, mobile_money, bank_account, wallet, cash');
  end if;
  v_clean := regexp_replace(coalesce(p_account_number, ''), '[\s-]', '', 'g');
  -- optional for cash, but checked whenever given (it is masked below)
  if (p_type <> 'cash' or v_clean <> '') and v_clean !~ '^\+?[0-9A-Za-z]{4,34}$' then
    perform private.raise_error(400, 'invalid_account_number',
      'account_number must have 4 to 34 letters or digits');
  end if;
  if char_length(p_provider) not between 1 and 64 then
    perform private.raise_error(400, 'invalid_provider', 'provider must be 1 to 64 characters');
  end if;
  if p_details is not null and jsonb_typeof(p_details) <> 'object' then
    perform private.raise_error(400, 'invalid_details', 'details must be a JSON object');
  end if;
  if p_metadata is not null and jsonb_typeof(p_metadata) <> 'object' then
    perform private.raise_error(400, 'invalid_metadata', 'metadata must be a JSON object');
  end if;
  if not exists (select from auth.users u where u.id = v_user) then
    perform private.raise_error(404, 'user_not_found', 'no such user');
  end if;

  -- one writer of a user's defaults at a time
  perform pg_advisory_xact_lock(hashtextextended('payment_methods:' || v_user::text, 0));
  v_default := coalesce(p_is_default, false) or not exists (
    select from public.payment_methods pm
    where pm.user_id = v_user and pm.is_default and pm.deleted_at is null
  );
  if v_default then
    update public.payment_methods set is_default = false
    where user_id = v_user and is_default and deleted_at is null;
  end if;

  insert into public.payment_methods
    (user_id, type, provider, account_number_masked, encrypted_details, is_default, metadata)
  values (
    v_user, p_type, p_provider,
    -- the last 4 digits only of a number long enough that they give it away
    case when v_clean = '' then null
         when char_length(ltrim(v_clean, '+')) >= 8 then '****' || right(ltrim(v_clean, '+'), 4)
         else '****' end,
    case when v_clean = '' and p_details is null then null
         else extensions.pgp_sym_encrypt(
           (jsonb_build_object('account_number', nullif(v_clean, '')) || coalesce(p_details, '{}'::jsonb))::text,
           private.payment_details_key())
    end,
    v_default, coalesce(p_metadata, '{}'::jsonb)
  )
  returning id into v_id;

  return query select v.* from public.user_payment_methods v where v.id = v_id;
end;
$$;

-- The caller's (or for the service role, anyone's) live payment method, locked.
create or replace function private.own_payment_method(p_payment_method_id uuid)
returns uuid
language plpgsql
set search_path = ''
as $$
declare
  v_user uuid;
begin
  select pm.user_id into v_user from public.payment_methods pm
  where pm.id = p_payment_method_id and pm.deleted_at is null
    and (private.require_caller() = 'service_role' or pm.user_id = auth.uid());
  if v_user is null then
    perform private.raise_error(404, 'not_found', 'no such payment method');
  end if;
  perform pg_advisory_xact_lock(hashtextextended('payment_methods:' || v_user::text, 0));
  -- looked at again under the lock: a removal that held it may have
  -- committed meanwhile, and acting on a removed method would change others
  if not exists (select from public.payment_methods pm
                 where pm.id = p_payment_method_id and pm.deleted_at is null) then
    perform private.raise_error(404, 'not_found', 'no such payment method');
  end if;
  return v_user;
end;
$$;

create or replace function public.set_default_payment_method(p_payment_method_id uuid)
returns setof public.user_payment_methods
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_user uuid := private.own_payment_method(p_payment_method_id);
begin
  update public.payment_methods set is_default = false
  where user_id = v_user and is_default and deleted_at is null and id <> p_payment_method_id;
  update public.payment_methods set is_default = true
  where id = p_payment_method_id and deleted_at is null and not is_default;
  return query select v.* from public.user_payment_methods v where v.id = p_payment_method_id;
end;
$$;

-- Soft delete: transactions keep pointing at the method; details are wiped.
create or replace function public.remove_payment_method(p_payment_method_id uuid)
returns boolean
language plpgsql
security definer
set search_path = ''
as $$
begin
  perform private.own_payment_method(p_payment_method_id);
  update public.payment_methods
  set deleted_at = now(), is_default = false, encrypted_details = null
  where id = p_payment_method_id and deleted_at is null;
  return found;
end;
$$;

-- Inlined, like get_balances (see there).
create or replace function public.list_payment_methods(p_user_id uuid default null)
returns setof public.user_payment_methods
language sql
stable
as $$
  select v.* from public.user_payment_methods v
  where p_user_id is null or v.user_id = p_user_id
  order by v.is_default desc, v.created_at desc, v.id
$$;

create or replace function public.verify_payment_method(
  p_payment_method_id uuid,
  p_verification_status text
) returns setof public.user_payment_methods
language plpgsql
security definer
set search_path = ''
as $$
begin
  if private.require_caller() <> 'service_role' then
    perform private.raise_error(403, 'forbidden', 'only the service role verifies payment methods');
  end if;
  if p_verification_status is null
     or p_verification_status not in ('unverified', 'pending', 'verified', 'failed') then
    perform private.raise_error(400, 'invalid_status',
      'verification_status must be one of unverified, pending, verified, failed');
  end if;
  update public.payment_methods
  set verification_status = p_verification_status,
      verified_at = case when p_verification_status = 'verified' then now() end
  where id = p_payment_method_id and deleted_at is null;
  if not found then
    perform private.raise_error(404, 'not_found', 'no such payment method');
  end if;
  return query select v.* from public.user_payment_methods v where v.id = p_payment_method_id;
end;
$$;

-- -----------------------------------------------------------------------------
-- Views (security invoker)
-- -----------------------------------------------------------------------------
-- Operators: volume per day, type, currency and status.
create view public.transaction_summary with (security_invoker = true) as
select date_trunc('day', t.created_at at time zone 'UTC')::date as day,
       t.type,
       t.currency,
       t.status,
       count(*) as transaction_count,
       sum(t.amount) as total_amount
from public.transactions t
group by 1, 2, 3, 4;

revoke all on public.transaction_summary from anon, authenticated, service_role;
grant select on public.transaction_summary to service_role;

-- The last 30 days, newest first; users see their own through RLS.
create view public.recent_transactions with (security_invoker = true) as
select t.id, t.reference, t.user_id, t.type, t.category, t.amount, t.currency, t.status,
       t.destination_user_id, t.description, t.created_at, t.completed_at
from public.transactions t
where t.created_at >= now() - interval '30 days'
order by t.created_at desc, t.id desc;

revoke all on public.recent_transactions from anon, authenticated, service_role;
grant select on public.recent_transactions to authenticated, service_role;

-- -----------------------------------------------------------------------------
-- Maintenance: idempotency keys live at least 24 hours.
-- -----------------------------------------------------------------------------
create or replace function public.purge_transaction_idempotency_keys(
  p_older_than interval default interval '24 hours'
) returns bigint
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_count bigint;
begin
  delete from public.transaction_idempotency_keys
  where created_at < now() - greatest(coalesce(p_older_than, interval '24 hours'), interval '24 hours');
  get diagnostics v_count = row_count;
  return v_count;
end;
$$;

select private.schedule_cron(
  'purge-transaction-idempotency-keys',
  '25 * * * *',
  'select public.purge_transaction_idempotency_keys()'
);

-- -----------------------------------------------------------------------------
-- Function privileges
-- -----------------------------------------------------------------------------
revoke all on function public.create_transaction(
  uuid, text, numeric, text, text, text, text, jsonb, text, uuid, uuid, timestamptz
) from public, anon;
revoke all on function public.transfer_funds(numeric, text, uuid, text, uuid, text, text, jsonb, text)
  from public, anon;
revoke all on function public.update_transaction_status(uuid, text, text, text, text, text, jsonb)
  from public, anon, authenticated;
revoke all on function public.get_transaction(uuid) from public, anon;
revoke all on function public.list_transactions(
  text, text, text, timestamptz, timestamptz, uuid, integer, timestamptz, uuid
) from public, anon;
revoke all on function public.list_transaction_events(uuid) from public, anon;
revoke all on function public.get_balances(uuid) from public, anon;
revoke all on function public.add_payment_method(text, text, text, jsonb, boolean, jsonb, uuid)
  from public, anon;
revoke all on function public.set_default_payment_method(uuid) from public, anon;
revoke all on function public.remove_payment_method(uuid) from public, anon;
revoke all on function public.list_payment_methods(uuid) from public, anon;
revoke all on function public.verify_payment_method(uuid, text) from public, anon, authenticated;
revoke all on function public.purge_transaction_idempotency_keys(interval)
  from public, anon, authenticated;

grant execute on function public.create_transaction(
  uuid, text, numeric, text, text, text, text, jsonb, text, uuid, uuid, timestamptz
) to authenticated, service_role;
grant execute on function public.transfer_funds(numeric, text, uuid, text, uuid, text, text, jsonb, text)
  to authenticated, service_role;
grant execute on function public.update_transaction_status(uuid, text, text, text, text, text, jsonb)
  to service_role;
grant execute on function public.get_transaction(uuid) to authenticated, service_role;
grant execute on function public.list_transactions(
  text, text, text, timestamptz, timestamptz, uuid, integer, timestamptz, uuid
) to authenticated, service_role;
grant execute on function public.list_transaction_events(uuid) to authenticated, service_role;
grant execute on function public.get_balances(uuid) to authenticated, service_role;
grant execute on function public.add_payment_method(text, text, text, jsonb, boolean, jsonb, uuid)
  to authenticated, service_role;
grant execute on function public.set_default_payment_method(uuid) to authenticated, service_role;
grant execute on function public.remove_payment_method(uuid) to authenticated, service_role;
grant execute on function public.list_payment_methods(uuid) to authenticated, service_role;
grant execute on function public.verify_payment_method(uuid, text) to service_role;
grant execute on function public.purge_transaction_idempotency_keys(interval) to service_role;
