// events: the event store over HTTP.
//
//   POST /events                          append one event or {"events": [...]} atomically
//                                         (user or service role)
//   GET  /events/aggregates/:type/:id     an aggregate's history in version order, from a version
//                                         (own aggregates for users, any for the service role)
//   GET  /events/stream                   all events after a global position (service role)
import { z } from "zod";
import { jsonObject, oneOrBatch, queryInt, text } from "../../../shared/schemas.ts";
import { authenticate, requireService, requireUserOrService } from "../../../shared/auth.ts";
import { type Row, rpc } from "../../../shared/db.ts";
import { notFound } from "../../../shared/errors.ts";
import { createApp, jsonBody, pathParams, queryParams } from "../../../shared/http.ts";

const aggregateType = z.string().regex(/^[a-z][a-z0-9_]{0,62}$/);
// "." and ".." are dot segments: no history URL could address them.
const aggregateId = text(256).refine((id) => id !== "." && id !== "..", {
  message: 'an aggregate id may not be "." or ".."',
});

const event = z.object({
  aggregate_type: aggregateType,
  aggregate_id: aggregateId,
  event_type: z.string().regex(/^[A-Za-z][A-Za-z0-9_.:-]{0,127}$/),
  payload: jsonObject,
  expected_version: z.number().int().min(-1).optional(),
  metadata: jsonObject.optional(),
  causation_id: text(128).optional(),
  correlation_id: text(128).optional(),
  user_id: z.uuid().optional(),
}).strict();

const appendBody = oneOrBatch(event, "events");

const historyQuery = z.object({
  from_version: queryInt(1, Number.MAX_SAFE_INTEGER, 1),
  // One more row than the page is read to see whether another page follows,
  // and get_aggregate_events reads at most 10000.
  limit: queryInt(1, 9999, 1000),
}).strict();

const streamQuery = z.object({
  after_position: queryInt(0, Number.MAX_SAFE_INTEGER, 0),
  limit: queryInt(1, 10000, 100),
  aggregate_type: aggregateType.optional(),
  event_type: text(128).optional(),
}).strict();

// A page's events stop once their payloads and metadata reach a megabyte
// (the first always comes: each is at most a megabyte): a page of 1,000
// one-megabyte events was a gigabyte through the function's memory. The
// reader stops there (max_bytes), and the select measures the same text, so
// the route knows whether the budget cut the page.
const PAGE_BYTES = 1024 * 1024;
const paged = { pageBytes: { max: PAGE_BYTES, of: ["payload", "metadata"] } } as const;

/** Whether a page read with `paged` stopped at its byte budget, not at its end. */
const cutByBytes = (rows: Row[]) =>
  rows.length > 0 && Number(rows[rows.length - 1].page_bytes) >= PAGE_BYTES;

/** The API shape of an event row: numbers for versions and positions, no internals. */
function toEvent({ tx_id: _, ordinality: _o, page_bytes: _p, row_bytes: _b, ...r }: Row) {
  return {
    ...r,
    id: String(r.id),
    version: Number(r.version),
    position: r.position === null ? null : Number(r.position),
  };
}

export const app = createApp("events");
app.use("*", authenticate());

app.post("/", async (c) => {
  const who = requireUserOrService(c);
  const { batch, items: events } = await jsonBody(c, appendBody);
  const correlationId = c.get("correlationId");
  const rows = await rpc(who, correlationId, "public.append_events", {
    events,
    correlation_id: correlationId,
  });
  const out = rows.map(toEvent);
  return c.json(batch ? { events: out } : { event: out[0] }, 201);
});

app.get("/aggregates/:type/:id", async (c) => {
  const who = requireUserOrService(c);
  const { type, id } = pathParams(c, z.object({ type: aggregateType, id: aggregateId }));
  const q = queryParams(c, historyQuery);
  const rows = await rpc(who, c.get("correlationId"), "public.get_aggregate_events", {
    aggregate_type: type,
    aggregate_id: id,
    from_version: q.from_version,
    limit: q.limit + 1,
    max_bytes: PAGE_BYTES,
  }, paged);
  if (rows.length === 0 && q.from_version === 1) throw notFound("no such aggregate");
  const page = rows.slice(0, q.limit).map(toEvent);
  const more = rows.length > q.limit || cutByBytes(rows);
  return c.json({
    aggregate_type: type,
    aggregate_id: id,
    events: page,
    next_from_version: more ? page[page.length - 1].version + 1 : null,
  });
});

app.get("/stream", async (c) => {
  const who = requireService(c);
  const q = queryParams(c, streamQuery);
  const rows = await rpc(who, c.get("correlationId"), "public.read_event_stream", {
    after_position: q.after_position,
    limit: q.limit,
    aggregate_type: q.aggregate_type,
    event_type: q.event_type,
    max_bytes: PAGE_BYTES,
  }, paged);
  const events = rows.map(toEvent);
  return c.json({
    events,
    next_after_position: events.length > 0 ? events[events.length - 1].position : q.after_position,
  });
});

if (import.meta.main) Deno.serve(app.fetch);
