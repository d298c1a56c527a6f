// queues: the generic message queue over HTTP.
//
//   POST /queues/:queue/messages              send one message or {"messages": [...]}
//                                             (user or service role; a user's messages carry
//                                             their user id and their idempotency keys)
//   POST /queues/:queue/claim                 claim a batch with a visibility timeout, waiting
//                                             up to wait_seconds for one, only messages whose
//                                             payload contains `filter` if given (service role)
//   POST /queues/:queue/pop                   claim and ack at once: at most once (service role)
//   POST /queues/:queue/messages/:id/ack      done (service role, lease holder)
//   POST /queues/:queue/messages/:id/nack     give back: retry with backoff or dead letter
//                                             (service role, lease holder)
//   POST /queues/:queue/messages/:id/archive  complete a message not yet finished, whoever
//                                             holds it (service role)
//   POST /queues/:queue/messages/:id/redrive  a dead letter due again, attempts at 0 (service role)
//   POST /queues/:queue/messages/:id/visibility
//                                             visible in visible_in_seconds, whoever holds it
//                                             (pgmq's set_vt; service role)
//   DELETE /queues/:queue/messages/:id        delete a message in any state (service role)
//   GET  /queues/:queue/metrics               depth, in flight, dead, oldest age, total_messages
//                                             (service role)
//   GET  /queues                              every queue's metrics (service role)
//
// Consumers are backends: claiming, settling, operating on messages by id and
// metrics are for the service role only. Users may only send, and never see
// other senders' messages.
import { z } from "zod";
import { bigintId, jsonObject, noBody, oneOrBatch, text } from "../../../shared/schemas.ts";
import { authenticate, requireService, requireUserOrService } from "../../../shared/auth.ts";
import { type Row, rpc, TextArray } from "../../../shared/db.ts";
import { badRequest } from "../../../shared/errors.ts";
import {
  createApp,
  createdOrReplayed,
  type Ctx,
  idempotencyKeyOf,
  jsonBody,
  pathParams,
} from "../../../shared/http.ts";

const queueName = z.string().regex(/^[a-z][a-z0-9_-]{0,62}$/);

const idempotencyKey = text(256);

// path parameters: a queue, and one of its messages
const queueRoute = z.object({ queue: queueName });
const messageRoute = queueRoute.extend({ id: bigintId });

const message = z.object({
  payload: jsonObject,
  message_type: z.string().regex(/^[A-Za-z][A-Za-z0-9_.:-]{0,127}$/).optional(),
  priority: z.number().int().min(0).max(1000).optional(),
  delay_seconds: z.number().int().min(0).max(31536000).optional(),
  max_attempts: z.number().int().min(1).max(100).optional(),
  idempotency_key: idempotencyKey.optional(),
  correlation_id: text(128).optional(),
  // FIFO group: one message of a group at a time, in send order
  group_key: text(128).optional(),
  headers: jsonObject.optional(),
}).strict();

const sendBody = oneOrBatch(message, "messages");

// wait_seconds: pgmq's read_with_poll. Up to 20 s, as SQS's long poll, well
// inside the edge function's wall clock. filter: pgmq's conditional (payload
// contains it), for every claim of the wait.
const claimBody = z.object({
  limit: z.number().int().min(1).max(1000).default(10),
  visibility_timeout_seconds: z.number().min(0.1).max(43200).default(30),
  consumer: text(128).optional(),
  wait_seconds: z.number().min(0).max(20).default(0),
  poll_interval_ms: z.number().int().min(50).max(5000).default(250),
  filter: jsonObject.optional(),
}).strict();

// What one claim or pop answers at most, as payload and headers JSON text
// (always at least one message): messages of up to 1 MiB each, a thousand to
// a claim, would lease more than any answer can carry. The database hands the
// rest back at once, attempt not counted.
const CLAIM_BYTES = 4 * 1024 * 1024;

const popBody = z.object({ limit: z.number().int().min(1).max(1000).default(1) }).strict();

// set_vt: when the message becomes visible, from now (0: at once)
const visibilityBody = z.object({
  visible_in_seconds: z.number().min(0).max(31536000),
}).strict();

// ack takes the lease token only; nack may add an error and a delay.
const settleBody = z.object({
  lease_token: z.uuid(),
  error: z.string().max(4000).optional(),
  delay_seconds: z.number().min(0).max(31536000).optional(),
}).strict();

/** A message as the API shows it: `due` is the claim index's bookkeeping (see install_leases). */
const toMessage = ({ due: _, ...r }: Row) => ({ ...r, id: String(r.id) });

export const app = createApp("queues");
app.use("*", authenticate());

app.post("/:queue/messages", async (c) => {
  const who = requireUserOrService(c);
  const { queue } = pathParams(c, queueRoute);
  const { batch, items } = await jsonBody(c, sendBody);
  // the Idempotency-Key header is a single message's key: a batch's
  // messages carry one each, and ignoring the header would send twice
  if (batch && c.req.header("idempotency-key") !== undefined) {
    throw badRequest(
      "idempotency_key_on_batch",
      "the Idempotency-Key header keys one message: give each message of a batch its idempotency_key",
    );
  }
  const messages = batch
    ? items
    : [{ ...items[0], idempotency_key: idempotencyKeyOf(c, items[0].idempotency_key) }];
  const rows = await rpc(who, c.get("correlationId"), "public.send_messages", {
    queue_name: queue,
    messages,
    correlation_id: c.get("correlationId"),
  }, { created: "created_at" });
  const out = rows.map(({ created: _, ...r }) => toMessage(r));
  return createdOrReplayed(
    c,
    batch ? { messages: out } : { message: out[0] },
    rows.some((r) => r.created),
  );
});

// A long poll claims, and while it finds nothing and time is left, pauses and
// claims again: each claim is its own transaction (a claim compares
// visible_at with now(), fixed for a transaction, so that it can bound the
// claim index; a loop inside one SQL call would not see later messages), and
// no connection is held during the pauses. It stops claiming once the
// client has gone, and hands back what a claim took while it left (attempt
// not counted), so no message waits out a lease held by nobody.
app.post("/:queue/claim", async (c) => {
  const who = requireService(c);
  const { queue } = pathParams(c, queueRoute);
  const body = await jsonBody(c, claimBody.default(claimBody.parse({})));
  const deadline = Date.now() + body.wait_seconds * 1000;
  const gone = c.req.raw.signal;
  for (;;) {
    if (gone.aborted) return c.json({ messages: [] });
    const rows = await rpc(who, c.get("correlationId"), "public.claim_messages", {
      queue_name: queue,
      limit: body.limit,
      visibility_timeout_seconds: body.visibility_timeout_seconds,
      consumer: body.consumer,
      filter: body.filter,
      max_bytes: CLAIM_BYTES,
    });
    if (rows.length > 0 && gone.aborted) {
      await rpc(who, c.get("correlationId"), "public.release_messages", {
        queue_name: queue,
        message_ids: new TextArray(rows.map((r) => String(r.id))),
        lease_tokens: new TextArray(rows.map((r) => r.lease_token as string)),
      });
      return c.json({ messages: [] });
    }
    const left = deadline - Date.now();
    if (rows.length > 0 || left <= 0) return c.json({ messages: rows.map(toMessage) });
    await new Promise((resolve) => setTimeout(resolve, Math.min(body.poll_interval_ms, left)));
  }
});

app.post("/:queue/pop", async (c) => {
  const who = requireService(c);
  const { queue } = pathParams(c, queueRoute);
  const body = await jsonBody(c, popBody.default({ limit: 1 }));
  const rows = await rpc(who, c.get("correlationId"), "public.pop_messages", {
    queue_name: queue,
    limit: body.limit,
    max_bytes: CLAIM_BYTES,
  });
  return c.json({ messages: rows.map(toMessage) });
});

// One route per action: Hono anchors only the last word of a pattern such as
// `:action{ack|nack}`, so ".../acknowledge" or ".../ack/x" would have acked.
const settle = (action: "ack" | "nack") => async (c: Ctx) => {
  const who = requireService(c);
  const { queue, id } = pathParams(c, messageRoute);
  const body: z.infer<typeof settleBody> = await jsonBody(
    c,
    action === "ack" ? settleBody.pick({ lease_token: true }) : settleBody,
  );
  const [row] = await rpc(who, c.get("correlationId"), `public.${action}_message`, {
    queue_name: queue,
    message_id: id,
    lease_token: body.lease_token,
    ...(action === "nack" ? { error: body.error, delay_seconds: body.delay_seconds } : {}),
  });
  return c.json({ message: toMessage(row) });
};
app.post("/:queue/messages/:id/ack", settle("ack"));
app.post("/:queue/messages/:id/nack", settle("nack"));

// an operator's actions on one message, whoever holds it
const operate = (action: "archive" | "redrive") => async (c: Ctx) => {
  const who = requireService(c);
  const { queue, id } = pathParams(c, messageRoute);
  await jsonBody(c, noBody);
  const [row] = await rpc(who, c.get("correlationId"), `public.${action}_message`, {
    queue_name: queue,
    message_id: id,
  });
  return c.json({ message: toMessage(row) });
};
app.post("/:queue/messages/:id/archive", operate("archive"));
app.post("/:queue/messages/:id/redrive", operate("redrive"));

app.post("/:queue/messages/:id/visibility", async (c) => {
  const who = requireService(c);
  const { queue, id } = pathParams(c, messageRoute);
  const body = await jsonBody(c, visibilityBody);
  const [row] = await rpc(who, c.get("correlationId"), "public.set_message_visibility", {
    queue_name: queue,
    message_id: id,
    visible_in_seconds: body.visible_in_seconds,
  });
  return c.json({ message: toMessage(row) });
});

app.delete("/:queue/messages/:id", async (c) => {
  const who = requireService(c);
  const { queue, id } = pathParams(c, messageRoute);
  await jsonBody(c, noBody);
  const [row] = await rpc(who, c.get("correlationId"), "public.delete_message", {
    queue_name: queue,
    message_id: id,
  });
  return c.json({ id: String(row.delete_message) });
});

// counts come as bigint text; a queue's counts fit a JSON number
const toStats = (m: Row) => ({
  ...m,
  depth: Number(m.depth),
  delayed: Number(m.delayed),
  blocked: Number(m.blocked),
  in_flight: Number(m.in_flight),
  dead: Number(m.dead),
  completed: Number(m.completed),
  total: Number(m.total),
  total_messages: Number(m.total_messages),
});

app.get("/:queue/metrics", async (c) => {
  const who = requireService(c);
  const { queue } = pathParams(c, queueRoute);
  const [m] = await rpc(who, c.get("correlationId"), "public.queue_metrics", { queue_name: queue });
  return c.json(toStats(m));
});

app.get("/", async (c) => {
  const who = requireService(c);
  const rows = await rpc(who, c.get("correlationId"), "public.list_queues");
  return c.json({ queues: rows.map(toStats) });
});

if (import.meta.main) Deno.serve(app.fetch);
