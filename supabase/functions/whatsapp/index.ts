// whatsapp: the outbound queue and sessions for backends and front-ends.
//
//   POST /whatsapp/messages              enqueue (service role; Idempotency-Key honoured)
//   GET  /whatsapp/messages/:id          one message (own for users, any for the service role)
//   POST /whatsapp/messages/:id/cancel   cancel a pending message (service role)
//   GET  /whatsapp/sessions              own session for users, all for the service role
//   GET  /whatsapp/metrics               queue depth, in flight, failed, send rate (service role)
import { z } from "zod";
import { bigintId, jsonObject, noBody, pageQuery, timestamp } from "../../../shared/schemas.ts";
import { authenticate, requireService, requireUserOrService } from "../../../shared/auth.ts";
import { jsonb, type Row, rpc, withClaims } from "../../../shared/db.ts";
import { notFound } from "../../../shared/errors.ts";
import {
  createApp,
  createdOrReplayed,
  decodeCursor,
  idempotencyKeyHeader,
  jsonBody,
  keysetPage,
  pathParams,
  queryParams,
} from "../../../shared/http.ts";
import { dispatchSoon } from "../../../shared/whatsapp_dispatch.ts";

const enqueueBody = z.object({
  recipient_phone: z.string().max(32),
  message_type: z.enum(["text", "template", "media", "interactive", "location"]),
  message_payload: jsonObject,
  priority: z.number().int().min(1).max(10).default(5),
  scheduled_at: timestamp.optional(),
  max_attempts: z.number().int().min(1).max(50).default(5),
  metadata: jsonObject.optional(),
}).strict();

const idParam = z.object({ id: bigintId });

const sessionsQuery = z.object({
  status: z.enum(["active", "inactive", "suspended", "expired"]).optional(),
  ...pageQuery,
}).strict();

const sessionCursor = z.object({ p: z.string().regex(/^\+[1-9][0-9]{6,14}$/) });

/** A queue row as the API shows it (lease internals left out). */
function message(row: Row) {
  const { lease_token: _t, locked_by: _b, locked_at: _a, visible_at, last_error, ...rest } = row;
  return {
    ...rest,
    id: String(row.id),
    error_message: last_error,
    next_attempt_at: row.status === "pending" ? visible_at : null,
  };
}

function session(row: Row) {
  const last = row.last_inbound_at as Date | null;
  return { ...row, window_open: last !== null && Date.now() - last.getTime() < 24 * 3600_000 };
}

export const app = createApp("whatsapp");
app.use("*", authenticate());

app.post("/messages", async (c) => {
  const who = requireService(c);
  const key = idempotencyKeyHeader(c);
  const body = await jsonBody(c, enqueueBody);
  const correlationId = c.get("correlationId");
  const { row, created } = await withClaims(who, correlationId, async (tx) => {
    const [{ id }] = await tx`
      select public.enqueue_whatsapp_message(
        p_recipient_phone := ${body.recipient_phone},
        p_message_type := ${body.message_type},
        p_message_payload := ${jsonb(tx, body.message_payload)},
        p_priority := ${body.priority},
        p_scheduled_at := ${body.scheduled_at ?? null},
        p_max_attempts := ${body.max_attempts},
        p_correlation_id := ${correlationId},
        p_idempotency_key := ${key ?? null},
        p_metadata := ${jsonb(tx, body.metadata ?? {})}) as id`;
    // created in this transaction, or an earlier request with the same key
    const [r] =
      await tx`select q.*, q.created_at = now() as created from public.get_whatsapp_message(${id}) q`;
    const { created, ...rest } = r;
    return { row: rest, created: created as boolean };
  });
  if (created && (row.scheduled_at as Date).getTime() <= Date.now()) {
    dispatchSoon(correlationId);
  }
  return createdOrReplayed(c, message(row), created);
});

app.get("/messages/:id", async (c) => {
  const who = requireUserOrService(c);
  const { id } = pathParams(c, idParam);
  const [row] = await rpc(who, c.get("correlationId"), "public.get_whatsapp_message", {
    message_id: id,
  });
  if (!row) throw notFound("no such message");
  return c.json(message(row));
});

app.post("/messages/:id/cancel", async (c) => {
  const who = requireService(c);
  const { id } = pathParams(c, idParam);
  await jsonBody(c, noBody);
  const [row] = await rpc(who, c.get("correlationId"), "public.cancel_whatsapp_message", {
    message_id: id,
  });
  return c.json(message(row));
});

app.get("/sessions", async (c) => {
  const who = requireUserOrService(c);
  const q = queryParams(c, sessionsQuery);
  const after = q.cursor ? decodeCursor(q.cursor, sessionCursor) : undefined;
  const rows = await rpc(who, c.get("correlationId"), "public.list_whatsapp_sessions", {
    status: q.status,
    limit: q.limit + 1,
    after_phone: after?.p,
  });
  return c.json(keysetPage(rows, q.limit, (last) => ({ p: last.phone_number }), session));
});

app.get("/metrics", async (c) => {
  const who = requireService(c);
  const [row] = await rpc(who, c.get("correlationId"), "public.get_whatsapp_queue_metrics");
  return c.json(row.get_whatsapp_queue_metrics);
});

if (import.meta.main) Deno.serve(app.fetch);
