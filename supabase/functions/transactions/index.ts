// transactions: money movement, wallets and payment methods over HTTP.
// Every rule (idempotency, state machine, holds, balances, who may do what)
// is enforced in SQL; handlers validate, call one SQL function, map the row.
//
//   POST   /transactions                           create (Idempotency-Key header)
//   GET    /transactions                           list, newest first (cursor; filters)
//   POST   /transactions/transfers                 immediate transfer to a user (id or phone)
//   GET    /transactions/balances                  wallets of the caller (or user_id, service)
//   GET    /transactions/payment-methods           list payment methods
//   POST   /transactions/payment-methods           add a payment method
//   POST   /transactions/payment-methods/:id/default  make it the default
//   DELETE /transactions/payment-methods/:id       remove it
//   GET    /transactions/:id                       one transaction
//   POST   /transactions/:id/status                state transition (service role)
//   GET    /transactions/:id/events                its status history
import { z } from "zod";
import {
  cursorTimestamp,
  jsonObject,
  noBody,
  pageQuery,
  text,
  timestamp,
} from "../../../shared/schemas.ts";
import {
  authenticate,
  type Principal,
  requireService,
  requireUserOrService,
} from "../../../shared/auth.ts";
import { type Row, rpc, withClaims } from "../../../shared/db.ts";
import { badRequest, notFound } from "../../../shared/errors.ts";
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

const TYPES = ["debit", "credit", "transfer", "payment", "refund", "fee", "commission"] as const;
const STATUSES = ["pending", "processing", "completed", "failed", "cancelled", "reversed"] as const;

const AMOUNT = /^\d{1,15}(\.\d{1,4})?$/;
/**
 * Amounts travel as decimal strings (or JSON numbers) and reach SQL as numeric
 * text. A JSON number is a double by the time it is read, exact only up to 15
 * significant digits: one with more (100000000000000.01 reads as ...02) is
 * refused, not rounded, and must come as a string.
 */
const amount = z.union([
  z.string().regex(AMOUNT),
  z.number().positive().max(1e15).transform((n) => String(n)).refine(
    (s) => AMOUNT.test(s) && s.replace(".", "").replace(/^0+/, "").length <= 15,
    "amounts of more than 15 significant digits or 4 decimals must be sent as strings",
  ),
]).refine((v) => Number(v) > 0, "amount must be positive");
const currency = z.string().regex(/^[A-Z]{3}$/);
const idParam = z.object({ id: z.uuid() }).strict();

const createBody = z.object({
  user_id: z.uuid().optional(),
  type: z.enum(TYPES),
  amount,
  currency,
  category: text(64).optional(),
  description: z.string().max(1000).optional(),
  metadata: jsonObject.optional(),
  destination_user_id: z.uuid().optional(),
  payment_method_id: z.uuid().optional(),
  created_at: timestamp.optional(),
}).strict();

const transferBody = z.object({
  from_user_id: z.uuid().optional(),
  to_user_id: z.uuid().optional(),
  to_phone: z.string().regex(/^\+?[1-9]\d{6,14}$/).optional(),
  amount,
  currency,
  description: z.string().max(1000).optional(),
  metadata: jsonObject.optional(),
}).strict().refine((b) => (b.to_user_id === undefined) !== (b.to_phone === undefined), {
  message: "give exactly one of to_user_id and to_phone",
  path: ["to_user_id"],
});

const statusBody = z.object({
  new_status: z.enum(STATUSES),
  reason: z.string().max(1000).optional(),
  error_code: text(64).optional(),
  error_message: z.string().max(2000).optional(),
  metadata: jsonObject.optional(),
}).strict();

const listQuery = z.object({
  status: z.enum(STATUSES).optional(),
  type: z.enum(TYPES).optional(),
  currency: currency.optional(),
  from: timestamp.optional(),
  to: timestamp.optional(),
  user_id: z.uuid().optional(),
  ...pageQuery,
}).strict();

const listCursor = z.object({ c: cursorTimestamp, i: z.uuid() });

const userQuery = z.object({ user_id: z.uuid().optional() }).strict();

const paymentMethodBody = z.object({
  user_id: z.uuid().optional(),
  type: z.enum(["card", "mobile_money", "bank_account", "wallet", "cash"]),
  account_number: z.string().min(4).max(64).optional(),
  provider: text(64).optional(),
  details: jsonObject.optional(),
  is_default: z.boolean().optional(),
  metadata: jsonObject.optional(),
}).strict();

/**
 * The user whose wallets or payment methods a listing shows. The service role
 * must name one: a listing of every user's would have no bound. (Who a write
 * acts for is private.acting_user's rule, in SQL: user_id goes as given.)
 */
function listedUser(who: Principal, given: string | undefined): string | undefined {
  if (who.role === "service_role" && given === undefined) {
    throw badRequest("user_id_required", "the service role lists one user's at a time: ?user_id=");
  }
  return given;
}

function one<T>(rows: readonly T[]): T {
  if (rows.length === 0) throw notFound();
  return rows[0];
}

export const app = createApp("transactions");
app.use("*", authenticate());

app.post("/", async (c) => {
  const who = requireUserOrService(c);
  const key = idempotencyKeyHeader(c, { required: true, max: 255 });
  const body = await jsonBody(c, createBody);
  const correlationId = c.get("correlationId");
  const { created, ...row } = one(
    await rpc(who, correlationId, "public.create_transaction", {
      user_id: body.user_id ?? null,
      type: body.type,
      amount: body.amount,
      currency: body.currency,
      idempotency_key: key,
      category: body.category,
      description: body.description,
      metadata: body.metadata,
      correlation_id: correlationId,
      destination_user_id: body.destination_user_id,
      payment_method_id: body.payment_method_id,
      created_at: body.created_at,
    }, { created: "initiated_at" }),
  );
  return createdOrReplayed(c, row, created as boolean);
});

app.get("/", async (c) => {
  const who = requireUserOrService(c);
  const q = queryParams(c, listQuery);
  const after = q.cursor ? decodeCursor(q.cursor, listCursor) : undefined;
  const rows = await rpc(who, c.get("correlationId"), "public.list_transactions", {
    status: q.status,
    type: q.type,
    currency: q.currency,
    from: q.from,
    to: q.to,
    user_id: q.user_id,
    limit: q.limit + 1,
    before_created_at: after?.c,
    before_id: after?.i,
  }, "cursor");
  return c.json(keysetPage(
    rows,
    q.limit,
    (last) => ({ c: last.cursor_ts, i: last.id }),
    ({ cursor_ts: _, ...r }) => r,
  ));
});

app.post("/transfers", async (c) => {
  const who = requireUserOrService(c);
  const key = idempotencyKeyHeader(c, { required: true, max: 255 });
  const body = await jsonBody(c, transferBody);
  const correlationId = c.get("correlationId");
  const { created, ...row } = one(
    await rpc(who, correlationId, "public.transfer_funds", {
      amount: body.amount,
      currency: body.currency,
      to_user_id: body.to_user_id,
      to_phone: body.to_phone,
      from_user_id: body.from_user_id,
      idempotency_key: key,
      description: body.description,
      metadata: body.metadata,
      correlation_id: correlationId,
    }, { created: "initiated_at" }),
  );
  return createdOrReplayed(c, row, created as boolean);
});

app.get("/balances", async (c) => {
  const who = requireUserOrService(c);
  const q = queryParams(c, userQuery);
  // numeric columns arrive as decimal strings and stay so
  const rows = await rpc(who, c.get("correlationId"), "public.get_balances", {
    user_id: listedUser(who, q.user_id),
  });
  return c.json({ data: rows });
});

app.get("/payment-methods", async (c) => {
  const who = requireUserOrService(c);
  const q = queryParams(c, userQuery);
  const rows = await rpc(who, c.get("correlationId"), "public.list_payment_methods", {
    user_id: listedUser(who, q.user_id),
  });
  return c.json({ data: rows });
});

// The account number and details travel as bound parameters, not as literals
// in the statement text as rpc() sends them: a failed statement's text goes
// to the server log (log_min_error_statement), and every statement's to
// pg_stat_activity, and these must reach neither.
app.post("/payment-methods", async (c) => {
  const who = requireUserOrService(c);
  const body = await jsonBody(c, paymentMethodBody);
  const rows = await withClaims(
    who,
    c.get("correlationId"),
    (tx) =>
      tx`select * from public.add_payment_method(
         p_type := ${body.type},
         p_account_number := ${body.account_number ?? null},
         p_provider := ${body.provider ?? null},
         p_details := ${body.details === undefined ? null : tx.json(body.details as never)},
         p_is_default := ${body.is_default ?? false},
         p_metadata := ${tx.json((body.metadata ?? {}) as never)},
         p_user_id := ${body.user_id ?? null})`,
  );
  return c.json(one(rows as Row[]), 201);
});

app.post("/payment-methods/:id/default", async (c) => {
  const who = requireUserOrService(c);
  const { id } = pathParams(c, idParam);
  await jsonBody(c, noBody);
  const row = one(
    await rpc(who, c.get("correlationId"), "public.set_default_payment_method", {
      payment_method_id: id,
    }),
  );
  return c.json(row);
});

app.delete("/payment-methods/:id", async (c) => {
  const who = requireUserOrService(c);
  const { id } = pathParams(c, idParam);
  await jsonBody(c, noBody);
  await rpc(who, c.get("correlationId"), "public.remove_payment_method", { payment_method_id: id });
  return c.body(null, 204);
});

app.get("/:id", async (c) => {
  const who = requireUserOrService(c);
  const { id } = pathParams(c, idParam);
  const row = one(
    await rpc(who, c.get("correlationId"), "public.get_transaction", { transaction_id: id }),
  );
  return c.json(row);
});

app.post("/:id/status", async (c) => {
  const who = requireService(c);
  const { id } = pathParams(c, idParam);
  const body = await jsonBody(c, statusBody);
  const correlationId = c.get("correlationId");
  const row = one(
    await rpc(who, correlationId, "public.update_transaction_status", {
      transaction_id: id,
      new_status: body.new_status,
      reason: body.reason,
      error_code: body.error_code,
      error_message: body.error_message,
      correlation_id: correlationId,
      metadata: body.metadata,
    }),
  );
  return c.json(row);
});

app.get("/:id/events", async (c) => {
  const who = requireUserOrService(c);
  const { id } = pathParams(c, idParam);
  const rows = await rpc(who, c.get("correlationId"), "public.list_transaction_events", {
    transaction_id: id,
  });
  return c.json({ data: rows });
});

if (import.meta.main) Deno.serve(app.fetch);
