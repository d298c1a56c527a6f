-- =============================================================================
-- Appends to one aggregate skip the batch's stream locking.
--
-- private.lock_streams creates a batch's missing streams and locks them in key
-- order so that two batches over the same aggregates cannot deadlock. A batch
-- naming one aggregate (every POST /events of a single event, and most
-- batches) has no order to keep: append_one's upsert of the stream row takes
-- the same lock. Before, such an append wrote the new stream row twice
-- (inserted at version 0, then updated) and read it once more to lock it.
-- =============================================================================
create or replace function private.lock_streams(p_events jsonb) returns void
language plpgsql
security definer
set search_path = ''
as $$
begin
  if (select count(distinct (e ->> 'aggregate_type', e ->> 'aggregate_id'))
      from jsonb_array_elements(p_events) e) < 2 then
    return;
  end if;
  insert into public.event_streams (aggregate_type, aggregate_id, version)
  select distinct e ->> 'aggregate_type', e ->> 'aggregate_id', 0
  from jsonb_array_elements(p_events) e
  order by 1, 2
  on conflict do nothing;
  perform from public.event_streams s
  where (s.aggregate_type, s.aggregate_id) in (
    select e ->> 'aggregate_type', e ->> 'aggregate_id' from jsonb_array_elements(p_events) e
  )
  order by s.aggregate_type, s.aggregate_id
  for update;
end;
$$;
