-- =============================================================================
-- Metric batches that report each new id.
--
-- The observability function commits single-metric requests that arrive
-- together as one multi-row insert (group commit, shared/coalesce.ts) and has
-- to answer each request with its own id. record_metrics_returning_ids is
-- record_metrics with the ids, in the order of the input array; record_metrics
-- now counts its rows, so the two cannot drift apart.
--
-- No cap on the batch size here (the older record_metrics refused more than
-- 1000): the HTTP API caps a request at 1000 metrics, while the WhatsApp claim
-- and webhook functions record a whole claim's or delivery's metrics at once,
-- and a cap meant for requests would roll back their work.
-- =============================================================================

-- -----------------------------------------------------------------------------
-- record_metrics_returning_ids
-- -----------------------------------------------------------------------------
create or replace function public.record_metrics_returning_ids(
  p_metrics jsonb,
  p_correlation_id text default null
) returns table (id bigint)
language plpgsql
set search_path = ''
as $$
begin
  if jsonb_typeof(p_metrics) is distinct from 'array' then
    perform private.raise_error(400, 'invalid_metrics', 'metrics must be a JSON array');
  end if;
  if exists (
    select from jsonb_array_elements(p_metrics) e
    where jsonb_typeof(e) <> 'object'
      or (e ? 'tags' and jsonb_typeof(e -> 'tags') not in ('object', 'null'))
  ) then
    perform private.raise_error(400, 'invalid_metrics', 'each metric must be an object with object tags');
  end if;

  -- Rows go in in array order, so the sequence hands out ascending ids in
  -- that order: sorting the ids gives them back in array order.
  return query
  with inserted as (
    insert into public.system_metrics
      (service_name, metric_type, metric_name, value, unit, tags, correlation_id, created_at)
    select m.service_name, m.metric_type, m.metric_name, m.value, m.unit,
           coalesce(m.tags, '{}'::jsonb), coalesce(m.correlation_id, p_correlation_id),
           coalesce(m.recorded_at, now())
    from jsonb_array_elements(p_metrics) with ordinality as e(metric, n)
    cross join lateral jsonb_to_record(e.metric) as m(
      service_name text, metric_type text, metric_name text, value double precision,
      unit text, tags jsonb, correlation_id text, recorded_at timestamptz
    )
    order by e.n
    returning system_metrics.id
  )
  select inserted.id from inserted order by inserted.id;
end;
$$;

-- -----------------------------------------------------------------------------
-- record_metrics: the same insert, counted
-- -----------------------------------------------------------------------------
create or replace function public.record_metrics(
  p_metrics jsonb,
  p_correlation_id text default null
) returns integer
language sql
set search_path = ''
as $$
  select count(*)::integer from public.record_metrics_returning_ids(p_metrics, p_correlation_id);
$$;

revoke all on function public.record_metrics_returning_ids(jsonb, text)
  from public, anon, authenticated;
grant execute on function public.record_metrics_returning_ids(jsonb, text) to service_role;
