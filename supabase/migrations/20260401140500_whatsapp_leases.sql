-- =============================================================================
-- WhatsApp outbound queue: its lease functions from the shared template.
--
-- whatsapp_message_queue (20260401110000_whatsapp_sessions.sql) follows the
-- lease contract of the event store / message queue migration, but sorts
-- before it, so it cannot call private.install_leases itself. This file,
-- right after 20260401140000, writes
--   private.whatsapp_message_queue_lease_claim / _lease_expire / _lease_settle
-- for it. The WhatsApp claim keeps its own query (head of line per recipient,
-- pair pacing and rate slots), so the generated claim goes unused (revoked
-- below, like the others); lease expiry and the settlement of retries and
-- failures use these.
-- =============================================================================
select private.install_leases('public.whatsapp_message_queue', 'whatsapp_message_queue',
  null, false, 'processing');

revoke all on function private.whatsapp_message_queue_lease_claim(text, integer, interval, text)
  from public, anon, authenticated, service_role;
revoke all on function private.whatsapp_message_queue_lease_expire(text, double precision, text)
  from public, anon, authenticated, service_role;
revoke all on function private.whatsapp_message_queue_lease_settle(
  bigint[], uuid[], text, text, text, double precision, interval, text, jsonb
) from public, anon, authenticated, service_role;

-- public.ingest_whatsapp_events (security invoker, run by the service role)
-- puts a send that Meta's status webhook reports throttled back with the
-- shared backoff formula.
grant execute on function private.backoff_delay(integer, double precision, double precision,
  double precision) to service_role;
