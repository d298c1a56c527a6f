-- =============================================================================
-- Name checks without counted repetition.
--
-- Postgres compiles a bounded repeat such as [a-z0-9_]{0,62} into an automaton
-- with one state per repetition, so a column check like
-- name ~ '^[a-z][a-z0-9_]{0,62}$' costs 7-25 us per row: more than the rest of
-- the insert into system_metrics or event_store. Each check below keeps
-- exactly the same rule (same first character, same characters after it, same
-- maximum length) as a star pattern plus a length test, which is ten times
-- cheaper. E.164 phone checks ({6,14}) are cheap enough and stay as they are.
-- private.check_queue_name, which every queue function calls, gets the same
-- rewrite at the end.
-- =============================================================================

-- -----------------------------------------------------------------------------
-- observability
-- -----------------------------------------------------------------------------
alter table public.system_metrics
  drop constraint system_metrics_service_name_check,
  add constraint system_metrics_service_name_check
    check (char_length(service_name) <= 63 and service_name ~ '^[a-z0-9][a-z0-9_.-]*$'),
  drop constraint system_metrics_metric_type_check,
  add constraint system_metrics_metric_type_check
    check (char_length(metric_type) <= 32 and metric_type ~ '^[a-z][a-z0-9_]*$'),
  drop constraint system_metrics_metric_name_check,
  add constraint system_metrics_metric_name_check
    check (char_length(metric_name) <= 128 and metric_name ~ '^[a-zA-Z][a-zA-Z0-9_.:/-]*$');

alter table public.system_audit_logs
  drop constraint system_audit_logs_action_check,
  add constraint system_audit_logs_action_check
    check (char_length(action) <= 128 and action ~ '^[a-zA-Z][a-zA-Z0-9_.:-]*$');

-- -----------------------------------------------------------------------------
-- whatsapp
-- -----------------------------------------------------------------------------
alter table public.whatsapp_inbound_messages
  drop constraint whatsapp_inbound_messages_message_type_check,
  add constraint whatsapp_inbound_messages_message_type_check
    check (char_length(message_type) <= 32 and message_type ~ '^[a-z_]+$');

-- -----------------------------------------------------------------------------
-- event store, message queue, jobs
-- -----------------------------------------------------------------------------
alter table public.event_streams
  drop constraint event_streams_aggregate_type_check,
  add constraint event_streams_aggregate_type_check
    check (char_length(aggregate_type) <= 63 and aggregate_type ~ '^[a-z][a-z0-9_]*$');

alter table public.event_store
  drop constraint event_store_aggregate_type_check,
  add constraint event_store_aggregate_type_check
    check (char_length(aggregate_type) <= 63 and aggregate_type ~ '^[a-z][a-z0-9_]*$'),
  drop constraint event_store_event_type_check,
  add constraint event_store_event_type_check
    check (char_length(event_type) <= 128 and event_type ~ '^[A-Za-z][A-Za-z0-9_.:-]*$');

alter table public.message_queue
  drop constraint message_queue_queue_name_check,
  add constraint message_queue_queue_name_check
    check (char_length(queue_name) <= 63 and queue_name ~ '^[a-z][a-z0-9_-]*$'),
  drop constraint message_queue_message_type_check,
  add constraint message_queue_message_type_check
    check (char_length(message_type) <= 128 and message_type ~ '^[A-Za-z][A-Za-z0-9_.:-]*$');

alter table public.background_jobs
  drop constraint background_jobs_job_type_check,
  add constraint background_jobs_job_type_check
    check (char_length(job_type) <= 63 and job_type ~ '^[a-z][a-z0-9_.-]*$');

-- The same rule for the queue functions' own check of a queue name.
create or replace function private.check_queue_name(p_queue_name text) returns void
language plpgsql
immutable
set search_path = ''
as $$
begin
  if p_queue_name is null or char_length(p_queue_name) > 63
     or p_queue_name !~ '^[a-z][a-z0-9_-]*$' then
    perform private.raise_error(400, 'invalid_queue_name',
      'queue names are 1-63 characters: a-z first, then a-z, 0-9, _ or -');
  end if;
end;
$$;
