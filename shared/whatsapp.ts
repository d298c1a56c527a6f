// WhatsApp configuration and webhook signatures, shared by the webhook, the
// enqueue API, the dispatcher, the local sandbox and the tests. Validated on
// its own so shared/env.ts keeps its meaning; missing credentials only fail
// the operations that need them.
import { createHash, createHmac, timingSafeEqual } from "node:crypto";
import { z } from "zod";
import { readEnvSchema } from "./env.ts";
import { HttpError } from "./errors.ts";
import type { Principal } from "./auth.ts";

const int = (min: number, max: number, fallback: number) =>
  z.coerce.number().int().min(min).max(max).default(fallback);

const LOOPBACK = /^(localhost|127\.\d+\.\d+\.\d+|\[::1\])$/;

const schema = z.object({
  // Meta app secret: the key of X-Hub-Signature-256.
  WHATSAPP_APP_SECRET: z.string().min(16, "must be at least 16 characters").optional(),
  // The token Meta echoes in the subscription handshake.
  WHATSAPP_VERIFY_TOKEN: z.string().min(8, "must be at least 8 characters").optional(),
  // System-user access token for the Cloud API.
  WHATSAPP_ACCESS_TOKEN: z.string().min(8, "must be at least 8 characters").optional(),
  // The business phone number id messages are sent from (the rate limit key).
  WHATSAPP_PHONE_NUMBER_ID: z.string().regex(/^[0-9A-Za-z_-]{1,64}$/, "must be a phone number id")
    .optional(),
  WHATSAPP_API_BASE_URL: z.string().url().refine((u) => {
    const url = new URL(u);
    return url.protocol === "https:" || (url.protocol === "http:" && LOOPBACK.test(url.hostname));
  }, "must be https (plain http only on loopback, for the local fake)").default(
    "https://graph.facebook.com",
  ),
  WHATSAPP_API_VERSION: z.string().regex(/^v\d{1,3}\.\d{1,2}$/, "must look like v21.0").default(
    "v21.0",
  ),
  WHATSAPP_RATE_LIMIT_PER_SECOND: int(1, 1000, 80),
  WHATSAPP_PAIR_INTERVAL_MS: int(0, 600_000, 6000),
  WHATSAPP_SEND_TIMEOUT_MS: int(50, 60_000, 10_000),
  WHATSAPP_DISPATCH_BUDGET_MS: int(100, 140_000, 50_000),
  WHATSAPP_BACKGROUND_BUDGET_MS: int(100, 140_000, 10_000),
  WHATSAPP_DISPATCH_CONCURRENCY: int(1, 1000, 100),
  WHATSAPP_LEASE_SECONDS: int(1, 3600, 60),
  WHATSAPP_LOOKAHEAD_MS: int(10, 5000, 250),
  WHATSAPP_RETRY_BASE_MS: int(1, 3_600_000, 2000),
  WHATSAPP_TOKEN_PAUSE_SECONDS: int(1, 86_400, 300),
  WHATSAPP_THROTTLE_PAUSE_SECONDS: int(1, 86_400, 30),
  // Meta sends webhook payloads of up to 3 MB, and retries for days one that
  // is refused: 4 MiB takes the largest with room to spare, and still bounds
  // what an unsigned sender can make us read before the signature check.
  WHATSAPP_WEBHOOK_MAX_BYTES: int(1024, 10 * 1024 * 1024, 4 * 1024 * 1024),
}).refine((c) => c.WHATSAPP_LEASE_SECONDS * 1000 >= 2 * c.WHATSAPP_SEND_TIMEOUT_MS, {
  // A lease that can end while its send is still waiting on Meta lets another
  // dispatcher claim the message and send it a second time.
  message: "must be at least twice WHATSAPP_SEND_TIMEOUT_MS",
  path: ["WHATSAPP_LEASE_SECONDS"],
});

export type WhatsAppConfig = z.infer<typeof schema>;

let cached: WhatsAppConfig | undefined;

export function whatsappConfig(): WhatsAppConfig {
  cached ??= readEnvSchema(schema, "WhatsApp configuration");
  return cached;
}

/** Forget the cached configuration (tests change variables between cases). */
export function resetWhatsappConfig(): void {
  cached = undefined;
}

/** A 503 naming what is missing; nothing runs half-configured. */
export function notConfigured(what: string): HttpError {
  return new HttpError(
    503,
    "whatsapp_not_configured",
    `WhatsApp is not configured: ${what} is missing`,
  );
}

/** Dispatching needs a token and a phone number id. */
export function canDispatch(cfg = whatsappConfig()): boolean {
  return Boolean(cfg.WHATSAPP_ACCESS_TOKEN && cfg.WHATSAPP_PHONE_NUMBER_ID);
}

/** The principal the webhook and the dispatcher act as inside the database. */
export const SERVICE_PRINCIPAL: Principal = {
  role: "service_role",
  claims: { role: "service_role" },
};

/** `sha256=` + hex HMAC-SHA256 of the exact body bytes, as Meta sends it. */
export function signWebhook(body: Uint8Array | string, secret: string): string {
  return "sha256=" + createHmac("sha256", secret).update(body).digest("hex");
}

const SIGNATURE = /^sha256=([0-9a-fA-F]{64})$/;

/** Checks X-Hub-Signature-256 against the raw body in constant time. */
export function verifyWebhookSignature(
  raw: Uint8Array,
  header: string | undefined,
  secret: string,
): boolean {
  const match = header ? SIGNATURE.exec(header.trim()) : null;
  if (!match) return false;
  const expected = createHmac("sha256", secret).update(raw).digest();
  const given = Uint8Array.from(match[1].match(/../g)!.map((h) => parseInt(h, 16)));
  return timingSafeEqual(expected, given);
}

/** Constant-time string equality; hashing first hides the lengths too. */
export function constantTimeEqual(a: string, b: string): boolean {
  const ha = createHash("sha256").update(a).digest();
  const hb = createHash("sha256").update(b).digest();
  return timingSafeEqual(ha, hb);
}
