// whatsapp-webhook: Meta's Cloud API webhook. No JWT (verify_jwt = false):
// it authenticates by X-Hub-Signature-256.
//
//   GET  /whatsapp-webhook            subscription handshake (hub.verify_token)
//   POST /whatsapp-webhook            signed events: messages, statuses, contacts, errors
//   POST /whatsapp-webhook/dispatch   drain the outbound queue now (service role; cron)
//
// Events are stored before the 200 (a 200 tells Meta to stop retrying, so
// answering first could lose them); sending replies happens after the answer.
// A delivery of more events than one ingest call takes is stored in several,
// one after the other, each its own transaction: the 200 comes only when all
// are stored. One that fails is a 5xx, and Meta retries the whole delivery;
// the parts stored already change nothing the second time (see
// public.ingest_whatsapp_events).
import { z } from "zod";
import { authenticate, requireService } from "../../../shared/auth.ts";
import { rpc } from "../../../shared/db.ts";
import { HttpError } from "../../../shared/errors.ts";
import { createApp, jsonBody, parseJsonText, readRawBody } from "../../../shared/http.ts";
import { log } from "../../../shared/log.ts";
import {
  canDispatch,
  constantTimeEqual,
  notConfigured,
  SERVICE_PRINCIPAL,
  verifyWebhookSignature,
  whatsappConfig,
} from "../../../shared/whatsapp.ts";
import { dispatch, dispatchSoon } from "../../../shared/whatsapp_dispatch.ts";
import { batches, mayHoldUnstorable, parseWebhook } from "./events.ts";

const dispatchBody = z.object({
  budget_ms: z.number().int().min(100).max(140_000).optional(),
}).strict().optional();

export const app = createApp("whatsapp-webhook");

app.get("/", (c) => {
  const expected = whatsappConfig().WHATSAPP_VERIFY_TOKEN;
  if (!expected) throw notConfigured("WHATSAPP_VERIFY_TOKEN");
  const mode = c.req.query("hub.mode");
  const token = c.req.query("hub.verify_token") ?? "";
  const challenge = c.req.query("hub.challenge");
  if (
    mode === "subscribe" && challenge && challenge.length <= 512 &&
    constantTimeEqual(token, expected)
  ) {
    return c.text(challenge, 200);
  }
  throw new HttpError(403, "verification_failed", "the verification token or mode is wrong");
});

app.post("/", async (c) => {
  const cfg = whatsappConfig();
  const secret = cfg.WHATSAPP_APP_SECRET;
  if (!secret) throw notConfigured("WHATSAPP_APP_SECRET");
  const raw = await readRawBody(c, cfg.WHATSAPP_WEBHOOK_MAX_BYTES);
  const signature = c.req.header("x-hub-signature-256");
  if (!signature) throw new HttpError(401, "missing_signature", "X-Hub-Signature-256 is required");
  if (!verifyWebhookSignature(raw, signature, secret)) {
    throw new HttpError(401, "invalid_signature", "X-Hub-Signature-256 does not match the body");
  }

  const text = new TextDecoder().decode(raw);
  const events = parseWebhook(parseJsonText(text, { exact: false }), mayHoldUnstorable(text));
  const correlationId = c.get("correlationId");
  for (const e of events.errors) {
    log("warn", "whatsapp webhook reported an error", { correlation_id: correlationId, ...e });
  }
  if (
    events.messages.length + events.statuses.length + events.contacts.length +
        events.errors.length === 0
  ) {
    return c.json({ received: true, ignored: events.ignored });
  }

  const summary: Record<string, number> = {};
  for (const batch of batches(events)) {
    const [row] = await rpc(SERVICE_PRINCIPAL, correlationId, "public.ingest_whatsapp_events", {
      ...batch,
      correlation_id: correlationId,
    });
    for (const [key, n] of Object.entries(row.ingest_whatsapp_events as Record<string, number>)) {
      summary[key] = (summary[key] ?? 0) + n;
    }
  }

  if (summary.messages_stored > 0) {
    dispatchSoon(correlationId);
  }
  return c.json({ received: true, ignored: events.ignored, ...summary });
});

app.post("/dispatch", authenticate(), async (c) => {
  requireService(c);
  const body = await jsonBody(c, dispatchBody);
  const cfg = whatsappConfig();
  if (!canDispatch(cfg)) throw notConfigured("WHATSAPP_ACCESS_TOKEN or WHATSAPP_PHONE_NUMBER_ID");
  const report = await dispatch({
    budgetMs: body?.budget_ms,
    correlationId: c.get("correlationId"),
    config: cfg,
  });
  return c.json(report);
});

if (import.meta.main) Deno.serve(app.fetch);
