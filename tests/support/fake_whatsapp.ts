// A fake WhatsApp Cloud API: `POST /{version}/{phone_number_id}/messages`
// with a bearer token, answering like Graph does (messaging_product, contacts,
// messages[].id = wamid, or {"error": {message, type, code, error_data,
// fbtrace_id}}). Tests tell it to fail with a given error code, slow down or
// drop connections. Built on node:http so it can really drop a socket.
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

/** Graph errors the dispatcher has to tell apart: HTTP status, title, details. */
export const CLOUD_API_ERRORS: Record<number, { status: number; title: string; details: string }> =
  {
    0: {
      status: 401,
      title: "AuthException",
      details: "We were unable to authenticate the app user.",
    },
    2: {
      status: 503,
      title: "Service temporarily unavailable",
      details: "Temporary due to downtime or overload.",
    },
    3: {
      status: 500,
      title: "API Method",
      details: "Capability or permissions issue.",
    },
    100: {
      status: 400,
      title: "Invalid parameter",
      details: "The parameter is invalid or missing.",
    },
    190: {
      status: 401,
      title: "Access token has expired",
      details: "Error validating access token.",
    },
    130429: {
      status: 400,
      title: "Rate limit hit",
      details:
        "Message failed to send because there were too many messages sent from this phone number in a short period of time",
    },
    131000: {
      status: 500,
      title: "Something went wrong",
      details: "Message failed to send due to an unknown error.",
    },
    131026: {
      status: 400,
      title: "Message undeliverable",
      details:
        "Unable to deliver message. The recipient may not be on WhatsApp or may have blocked the business.",
    },
    131047: {
      status: 400,
      title: "Re-engagement message",
      details:
        "Message failed to send because more than 24 hours have passed since the customer last replied to this number.",
    },
    131048: {
      status: 400,
      title: "Spam rate limit hit",
      details:
        "Message failed to send because there are restrictions on how many messages can be sent from this phone number.",
    },
    131056: {
      status: 400,
      title: "(Business Account, Consumer Account) pair rate limit hit",
      details:
        "Message failed to send because there were too many messages sent from this phone number to the same phone number in a short period of time.",
    },
  };

const TYPES = new Set([
  "text",
  "template",
  "image",
  "video",
  "audio",
  "document",
  "sticker",
  "interactive",
  "location",
]);

export interface FakeRequest {
  /** performance.now() when the request arrived */
  at: number;
  to: string;
  type: string;
  body: Record<string, unknown>;
  /** what the fake answered: a wamid (also when the answer was cut), an error code, or "dropped" */
  outcome: string;
}

interface Rule {
  kind: "error" | "drop" | "slow" | "cut" | "id";
  id?: string;
  code?: number;
  message?: string;
  ms?: number;
  times: number;
  to?: string;
}

export interface FakeWhatsApp {
  url: string;
  token: string;
  phoneNumberId: string;
  /** every request that reached the messages endpoint, in arrival order */
  requests: FakeRequest[];
  /** delay before each answer */
  latencyMs: number;
  /**
   * answer the next `times` sends (optionally only to `to`, digits) with Graph error `code`
   * (and `message` instead of Graph's own)
   */
  failNext(code: number, opts?: { times?: number; to?: string; message?: string }): void;
  /** close the connection without answering, `times` times */
  dropNext(opts?: { times?: number; to?: string }): void;
  /**
   * accept the next `times` sends but lose the answer: 200 and the start of
   * the body, then the connection closes before the message id
   */
  cutNext(opts?: { times?: number; to?: string }): void;
  /** answer the next `times` sends only after `ms` (past the client's timeout, it is one) */
  slowNext(ms: number, opts?: { times?: number; to?: string }): void;
  /** accept the next `times` sends with `id` as the message id (Meta's are printable ASCII) */
  idNext(id: string, opts?: { times?: number; to?: string }): void;
  /**
   * called as each request arrives, before it is answered; the answer waits
   * for what it returns (errors are ignored)
   */
  onRequest?: (request: FakeRequest) => unknown;
  /** requests that got a wamid */
  accepted(): FakeRequest[];
  reset(): void;
  close(): Promise<void>;
}

export interface FakeOptions {
  port?: number;
  hostname?: string;
  latencyMs?: number;
  token?: string;
  phoneNumberId?: string;
  /** print one line per accepted message (the local sandbox) */
  log?: boolean;
}

/** Graph's 200-299 are one family: the app lacks a permission (HTTP 403). */
const API_PERMISSION = {
  status: 403,
  title: "API Permission",
  details: "Permission is either not granted or has been removed.",
};

function graphError(code: number, message?: string) {
  const known = CLOUD_API_ERRORS[code] ??
    (code >= 200 && code <= 299 ? API_PERMISSION : undefined) ??
    { status: 400, title: "Unknown error", details: "unknown" };
  return {
    status: known.status,
    body: {
      error: {
        message: message ?? `(#${code}) ${known.title}`,
        type: "OAuthException",
        code,
        error_data: { messaging_product: "whatsapp", details: known.details },
        fbtrace_id: "A" + crypto.randomUUID().replaceAll("-", "").slice(0, 22),
      },
    },
  };
}

function wamid(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(24));
  return "wamid." + btoa(String.fromCharCode(...bytes)).replace(/=+$/, "");
}

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Uint8Array[] = [];
    req.on("data", (c: Uint8Array) => chunks.push(c));
    req.on("end", () => resolve(new TextDecoder().decode(concat(chunks))));
    req.on("error", reject);
  });
}

function concat(chunks: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.byteLength, 0));
  let offset = 0;
  for (const c of chunks) {
    out.set(c, offset);
    offset += c.byteLength;
  }
  return out;
}

/** Validates a send request the way Graph does, returning an error code or null. */
function invalidRequest(body: unknown): string | null {
  if (!body || typeof body !== "object") return "the body must be a JSON object";
  const b = body as Record<string, unknown>;
  if (b.messaging_product !== "whatsapp") return "messaging_product must be whatsapp";
  if (typeof b.to !== "string" || !/^[1-9][0-9]{6,14}$/.test(b.to)) {
    return "to must be a phone number";
  }
  if (typeof b.type !== "string" || !TYPES.has(b.type)) return "type is not supported";
  const content = b[b.type];
  if (!content || typeof content !== "object") return `the ${b.type} object is required`;
  return null;
}

export async function startFakeWhatsApp(opts: FakeOptions = {}): Promise<FakeWhatsApp> {
  const token = opts.token ?? "fake-access-token-" + crypto.randomUUID();
  const phoneNumberId = opts.phoneNumberId ?? "106540352242922";
  let rules: Rule[] = [];
  const requests: FakeRequest[] = [];

  const takeRule = (to: string): Rule | undefined => {
    const rule = rules.find((r) => r.times > 0 && (!r.to || r.to === to));
    if (rule) rule.times--;
    return rule;
  };

  const send = (res: ServerResponse, status: number, body: unknown) => {
    if (res.destroyed || res.writableEnded) return;
    res.writeHead(status, { "content-type": "application/json" });
    res.end(JSON.stringify(body));
  };

  const fake: FakeWhatsApp = {
    url: "",
    token,
    phoneNumberId,
    requests,
    latencyMs: opts.latencyMs ?? 0,
    failNext(code, o = {}) {
      rules.push({ kind: "error", code, message: o.message, times: o.times ?? 1, to: o.to });
    },
    dropNext(o = {}) {
      rules.push({ kind: "drop", times: o.times ?? 1, to: o.to });
    },
    cutNext(o = {}) {
      rules.push({ kind: "cut", times: o.times ?? 1, to: o.to });
    },
    slowNext(ms, o = {}) {
      rules.push({ kind: "slow", ms, times: o.times ?? 1, to: o.to });
    },
    idNext(id, o = {}) {
      rules.push({ kind: "id", id, times: o.times ?? 1, to: o.to });
    },
    accepted: () => requests.filter((r) => r.outcome.startsWith("wamid.")),
    reset() {
      rules = [];
      requests.length = 0;
      fake.latencyMs = opts.latencyMs ?? 0;
      fake.onRequest = undefined;
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };

  // Control routes for a fake running in another process (benchmarks):
  // GET /__fake/requests, POST /__fake/reset, POST /__fake/latency {"ms": n}.
  const control = (path: string, raw: string, res: ServerResponse) => {
    if (path === "/__fake/requests") {
      return send(
        res,
        200,
        requests.map(({ at, to, type, outcome }) => ({ at, to, type, outcome })),
      );
    }
    if (path === "/__fake/reset") {
      fake.reset();
      return send(res, 200, { ok: true });
    }
    if (path === "/__fake/latency") {
      fake.latencyMs = Number(JSON.parse(raw || "{}").ms ?? 0);
      return send(res, 200, { ok: true, latency_ms: fake.latencyMs });
    }
    return send(res, 404, { error: { message: "unknown control route", code: 100 } });
  };

  const server = createServer(async (req, res) => {
    const arrived = performance.now();
    const raw = await readBody(req).catch(() => "");
    const path = new URL(req.url ?? "/", "http://fake").pathname;
    if (path.startsWith("/__fake/")) return control(path, raw, res);
    const match = /^\/(v\d+\.\d+)\/([^/]+)\/messages$/.exec(path);
    if (req.method !== "POST" || !match) {
      const e = graphError(100, "Unsupported request - method type: " + req.method);
      return send(res, e.status, e.body);
    }
    if (req.headers.authorization !== `Bearer ${token}`) {
      const e = graphError(190, "Invalid OAuth access token - Cannot parse access token");
      return send(res, e.status, e.body);
    }
    let body: Record<string, unknown> = {};
    try {
      body = JSON.parse(raw);
    } catch {
      const e = graphError(100, "(#100) The request body is not valid JSON");
      return send(res, e.status, e.body);
    }
    const problem = match[2] === phoneNumberId ? invalidRequest(body) : "unknown phone number id";
    const to = String(body.to ?? "");
    const entry: FakeRequest = {
      at: arrived,
      to,
      type: String(body.type ?? ""),
      body,
      outcome: "",
    };
    requests.push(entry);
    try {
      await fake.onRequest?.(entry);
    } catch {
      // the hook's failure is the test's to see, not the client's
    }
    const rule = problem ? undefined : takeRule(to);
    const delay = rule?.kind === "slow" ? rule.ms! : fake.latencyMs;
    if (delay > 0) await new Promise((r) => setTimeout(r, delay));
    if (problem) {
      entry.outcome = "100";
      const e = graphError(100, `(#100) Invalid parameter: ${problem}`);
      return send(res, e.status, e.body);
    }
    if (rule?.kind === "drop") {
      entry.outcome = "dropped";
      req.socket.destroy();
      return;
    }
    if (rule?.kind === "error") {
      entry.outcome = String(rule.code);
      const e = graphError(rule.code!, rule.message);
      return send(res, e.status, e.body);
    }
    entry.outcome = rule?.kind === "id" ? rule.id! : wamid();
    if (rule?.kind === "cut") {
      res.writeHead(200, { "content-type": "application/json", "content-length": "400" });
      res.write(`{"messaging_product":"whatsapp","contacts":[{"input":"${to}"`);
      setTimeout(() => req.socket.destroy(), 10);
      return;
    }
    if (opts.log) {
      console.log(
        `[whatsapp sandbox] ${entry.type} to +${to}: ${JSON.stringify(body[entry.type])}`,
      );
    }
    send(res, 200, {
      messaging_product: "whatsapp",
      contacts: [{ input: to, wa_id: to }],
      messages: [{ id: entry.outcome }],
    });
  });
  server.keepAliveTimeout = 60_000;

  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(opts.port ?? 0, opts.hostname ?? "127.0.0.1", resolve);
  });
  const address = server.address() as AddressInfo;
  fake.url = `http://127.0.0.1:${address.port}`;
  return fake;
}

/** Sets WHATSAPP_* variables for a test (undefined removes one) and drops the cached config. */
export async function configureWhatsApp(
  vars: Record<string, string | number | undefined>,
): Promise<void> {
  for (const [key, value] of Object.entries(vars)) {
    if (value === undefined) Deno.env.delete(key);
    else Deno.env.set(key, String(value));
  }
  const { resetWhatsappConfig } = await import("../../shared/whatsapp.ts");
  resetWhatsappConfig();
}
