-- Payment methods: masked numbers only, encrypted details no API role can
-- read, one default per user, verification only by the service role, and
-- the RLS matrix (anon, two users, service_role).
begin;
select plan(43);

create temp table ids as select tests.create_user() as alice, tests.create_user() as bob;
grant select on ids to authenticated, anon, service_role;

-- alice adds two methods -------------------------------------------------------
select tests.authenticate_as((select alice from ids));
create temp table pm as
select (select id from public.add_payment_method(p_type := 'mobile_money', p_account_number := '0788-123-456',
          p_provider := 'mtn', p_details := '{"holder": "Alice"}')) as momo,
       null::uuid as card, null::uuid as bob_card;
grant select, update on pm to authenticated, anon, service_role;
update pm set card = (select id from public.add_payment_method('card', '4111 1111 1111 1234', 'visa'));

select is((select account_number_masked from public.user_payment_methods where id = (select momo from pm)),
  '****3456', 'only a masked number is kept in the clear');
select ok((select is_default from public.user_payment_methods where id = (select momo from pm)),
  'the first method becomes the default');
select ok(not (select is_default from public.user_payment_methods where id = (select card from pm)),
  'a later one does not, unless asked');
select is((select verification_status || ':' || is_verified from public.user_payment_methods
           where id = (select card from pm)), 'unverified:false', 'new methods are unverified');
select throws_ok($$select encrypted_details from public.payment_methods$$, '42501', null,
  'a user cannot read encrypted details');
select throws_ok($$select * from public.payment_methods$$, '42501', null,
  'select * is refused too: the column is not granted');
select is((select count(*)::int from public.list_payment_methods()), 2, 'alice lists her two methods');

-- default switching
select is((select is_default from public.set_default_payment_method((select card from pm))), true,
  'set_default makes the card the default');
select is((select count(*)::int from public.user_payment_methods where is_default), 1, 'still one default');
select is((select id from public.user_payment_methods where is_default), (select card from pm),
  'and it is the card');
select is((select count(*)::int from public.add_payment_method('bank_account', 'RW12BK000123456789', 'bk',
  p_is_default := true) where is_default), 1, 'adding with is_default takes the default over');
select is((select count(*)::int from public.user_payment_methods where is_default), 1,
  'one default after that too');
create temp table short_pm as select * from public.add_payment_method('bank_account', '1234', 'bk');
select is((select account_number_masked from short_pm), '****',
  'a number of 4 digits is not shown at all');
select public.remove_payment_method((select id from short_pm));

-- verification is the service role's
select throws_ok($$update public.payment_methods set verification_status = 'verified'$$,
  '42501', null, 'a user cannot set verification fields');
select throws_ok($$select public.verify_payment_method((select card from pm), 'verified')$$, '42501', null,
  'a user cannot call verify_payment_method');
select throws_ok($$select public.add_payment_method('card', '4111111111111111', p_user_id := (select bob from ids))$$,
  'PT403', 'forbidden', 'alice cannot add a method for bob');
select throws_ok($$select public.add_payment_method('card', '12')$$, 'PT400', 'invalid_account_number',
  'account numbers are checked');
select throws_ok($$select public.add_payment_method('cheque', '12345678')$$, 'PT400', 'invalid_type',
  'types are checked');

-- bob ---------------------------------------------------------------------------
select tests.authenticate_as((select bob from ids));
update pm set bob_card = (select id from public.add_payment_method('card', '5500000000000004', 'mastercard'));
select is((select count(*)::int from public.user_payment_methods), 1, 'bob sees only his own method');
select is((select count(*)::int from public.list_payment_methods((select alice from ids))), 0,
  'bob cannot list alice''s methods');
select throws_ok($$select public.set_default_payment_method((select momo from pm))$$, 'PT404', 'not_found',
  'bob cannot make alice''s method a default');
select throws_ok($$select public.remove_payment_method((select momo from pm))$$, 'PT404', 'not_found',
  'bob cannot remove alice''s method');
select throws_ok($$select public.create_transaction((select bob from ids), 'payment', 1, 'RWF',
  p_payment_method_id := (select momo from pm))$$, 'PT404', 'payment_method_not_found',
  'bob cannot pay with alice''s method');

-- anon --------------------------------------------------------------------------
select tests.authenticate_as_anon();
select throws_ok($$select id from public.payment_methods$$, '42501', null, 'anon cannot read payment methods');
select throws_ok($$select id from public.user_payment_methods$$, '42501', null, 'anon cannot read the view');
select throws_ok($$select public.add_payment_method('card', '4111111111111111')$$, '42501', null,
  'anon cannot add payment methods');

-- service role ------------------------------------------------------------------
select tests.authenticate_as_service_role();
select is((select count(*)::int from public.user_payment_methods), 4, 'service_role sees every method');
select throws_ok($$select encrypted_details from public.payment_methods$$, '42501', null,
  'not even service_role reads encrypted details through the API');
select is((select is_verified from public.verify_payment_method((select card from pm), 'verified')), true,
  'service_role verifies');
select ok((select verified_at is not null from public.user_payment_methods where id = (select card from pm)),
  'verification is timestamped');
select throws_ok($$select public.verify_payment_method((select card from pm), 'maybe')$$, 'PT400', 'invalid_status',
  'verification statuses are checked');
select is((select user_id from public.add_payment_method('cash', null, p_user_id := (select bob from ids))),
  (select bob from ids), 'service_role adds methods for a user');
select throws_ok($$select public.add_payment_method('cash', 'ab#1', p_user_id := (select bob from ids))$$,
  'PT400', 'invalid_account_number', 'a number given for cash is checked too');
select throws_ok($$select public.add_payment_method('card', '4111111111111111', repeat('p', 65),
  p_user_id := (select bob from ids))$$, 'PT400', 'invalid_provider', 'providers are 1 to 64 characters');

-- owner-level guards -------------------------------------------------------------
select tests.clear_authentication();
select ok((select convert_from(extensions.pgp_sym_decrypt_bytea(encrypted_details, private.payment_details_key()), 'UTF8')::jsonb
           = '{"account_number": "0788123456", "holder": "Alice"}'::jsonb
           from public.payment_methods where id = (select momo from pm)),
  'details are stored encrypted and decrypt to the full number');
select ok((select position('0788123456' in encode(encrypted_details, 'escape')) = 0
           from public.payment_methods where id = (select momo from pm)),
  'the stored bytes do not contain the number');
select throws_ok($$update public.payment_methods set is_default = true where id = (select momo from pm)$$,
  '23505', null, 'the partial unique index allows one default per user');
select set_config('request.jwt.claims', json_build_object('role', 'authenticated', 'sub', (select alice from ids))::text, true);
select throws_ok($$update public.payment_methods set verification_status = 'verified'
  where id = (select momo from pm)$$, 'PT403', 'forbidden',
  'the trigger refuses verification by a user even where privileges would allow it');
select tests.clear_authentication();

-- removal
select tests.authenticate_as((select alice from ids));
select ok(public.remove_payment_method((select card from pm)), 'alice removes her card');
select is((select count(*)::int from public.user_payment_methods where id = (select card from pm)), 0,
  'removed methods are not listed');
select throws_ok($$select public.set_default_payment_method((select card from pm))$$, 'PT404', 'not_found',
  'a removed method cannot become the default');
select throws_ok($$select public.create_transaction((select alice from ids), 'payment', 1, 'RWF',
  p_payment_method_id := (select card from pm))$$, 'PT404', 'payment_method_not_found',
  'a removed method cannot pay');
select tests.clear_authentication();
select is((select encrypted_details from public.payment_methods where id = (select card from pm)), null,
  'removal wipes the encrypted details');

select * from finish();
rollback;
