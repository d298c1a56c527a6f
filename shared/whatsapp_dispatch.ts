// The WhatsApp dispatcher: drains the outbound queue through the Cloud API
// within a time budget. SQL owns the invariants (claim with lease, the shared
// rate limiter, pair pacing, per-recipient order, backoff, dead letters);
// this module sends at the slot each claim hands out, classifies what the
// Cloud API answered and reports outcomes back in batches.
import { dbText, rpc, toHttpError } from "./db.ts";
import { type HttpError, isInputError } from "./errors.ts";
import { runInBackground } from "./http.ts";
import { log } from "./log.ts";
import { canDispatch, SERVICE_PRINCIPAL, type WhatsAppConfig, whatsappConfig } from "./whatsapp.ts";

export interface ClaimedMessage {
  id: number;
  lease_token: string;
  recipient_phone: string;
  message_type: "text" | "template" | "media" | "interactive" | "location";
  message_payload: Record<string, unknown>;
  attempts: number;
  max_attempts: number;
  correlation_id: string | null;
  /** the send slot, epoch ms on the database clock */
  slot_ms: number;
}

interface Claim {
  messages: ClaimedMessage[];
  /** the database clock as the claim ended (set whenever messages are handed out) */
  now_ms?: number;
  paused: boolean;
  pause_reason: string | null;
  wait_ms: number;
  next_due_ms: number | null;
}

export type Outcome = "sent" | "retry" | "failed" | "stop" | "refused" | "throttle";

export interface SendResult {
  id: number;
  lease_token: string;
  outcome: Outcome;
  wamid?: string;
  error_code?: string;
  error_message?: string;
  duration_ms: number;
}

export interface DispatchReport {
  dispatcher_id: string;
  claimed: number;
  sent: number;
  retried: number;
  dead_lettered: number;
  failed: number;
  stopped: number;
  throttled: number;
  ignored: number;
  paused: string | null;
  duration_ms: number;
}

/**
 * Throttling: stop sending for a while and put the messages back without
 * spending an attempt (a spell of throttling must not dead-letter a backlog).
 * So is 131057, the business account in maintenance mode (Meta names a
 * throughput upgrade as one cause): it passes, and meanwhile every send
 * would fail alike.
 */
const THROTTLED = new Set([4, 80007, 130429, 131048, 131056, 131057]);
/** Meta-side trouble that is worth another try (133004: server temporarily unavailable). */
const TRANSIENT = new Set([1, 2, 131000, 131016, 133004]);
/** The token is expired or invalid: stop sending, alert, keep the messages. */
const TOKEN = new Set([0, 190]);
/**
 * The business account cannot send at all (permissions, locked, payment,
 * number not registered, policy block): kept and paused as for a refused
 * token, for every message would fail alike. Graph's permission errors are
 * 3 (a capability the app lacks; it comes with HTTP 500, so it must not be
 * taken for a transient fault), 10 and the whole 200-299 family.
 */
const ACCOUNT = new Set([3, 10, 368, 131031, 131042, 133010]);
const isAccountRefusal = (code: number) => ACCOUNT.has(code) || (code >= 200 && code <= 299);

/** The outcomes that stop sending and pause the number, and why (as SQL names the pause). */
type Refusal = "stop" | "refused" | "throttle";
const PAUSED: Record<Refusal, string> = {
  stop: "the access token was refused",
  refused: "the business account was refused",
  throttle: "the number is throttled",
};
const REASON: Record<Refusal, string> = {
  stop: "token_invalid",
  refused: "account_refused",
  throttle: "throttled",
};

/** Maps a Cloud API answer to what the queue should do with the message. */
export function classify(httpStatus: number, code: number | undefined): Outcome {
  if (code !== undefined && TOKEN.has(code)) return "stop";
  if (code !== undefined && isAccountRefusal(code)) return "refused";
  // the HTTP status says it whatever Graph code comes with it
  if (httpStatus === 401) return "stop";
  if (httpStatus === 429 || (code !== undefined && THROTTLED.has(code))) return "throttle";
  if (code !== undefined && TRANSIENT.has(code)) return "retry";
  if (httpStatus >= 500 || httpStatus === 408) return "retry";
  return "failed";
}

const accepted = (httpStatus: number) => httpStatus >= 200 && httpStatus < 300;

/** A message id the queue can keep as sent. */
const WAMID = /^[\x21-\x7e]{1,256}$/;

/**
 * Meta answered 2xx but the message id never arrived (the body was cut off,
 * or is not the Cloud API's): Meta has taken the message, so sending it again
 * would deliver it twice. It ends failed with `unconfirmed_send`, for an
 * operator to look at, instead of being retried.
 */
function unconfirmed(
  done: (r: Omit<SendResult, "id" | "lease_token" | "duration_ms">) => SendResult,
  httpStatus: number,
  what: string,
): SendResult {
  return done({
    outcome: "failed",
    error_code: "unconfirmed_send",
    error_message: dbText(`HTTP ${httpStatus} without a message id: ${what}`, 500),
  });
}

/** The Cloud API request body for a queued message. */
function cloudApiRequest(m: ClaimedMessage): Record<string, unknown> {
  const body: Record<string, unknown> = {
    messaging_product: "whatsapp",
    recipient_type: "individual",
    to: m.recipient_phone.replace(/^\+/, ""),
  };
  if (m.correlation_id) body.biz_opaque_callback_data = m.correlation_id;
  if (m.message_type === "media") {
    const { media_type, ...media } = m.message_payload;
    body.type = media_type;
    body[String(media_type)] = media;
  } else {
    body.type = m.message_type;
    body[m.message_type] = m.message_payload;
  }
  return body;
}

/** One send: POST {base}/{version}/{phone_number_id}/messages with the bearer token. */
export async function sendMessage(cfg: WhatsAppConfig, m: ClaimedMessage): Promise<SendResult> {
  const url = `${
    cfg.WHATSAPP_API_BASE_URL.replace(/\/+$/, "")
  }/${cfg.WHATSAPP_API_VERSION}/${cfg.WHATSAPP_PHONE_NUMBER_ID}/messages`;
  const started = performance.now();
  const done = (r: Omit<SendResult, "id" | "lease_token" | "duration_ms">): SendResult => ({
    id: m.id,
    lease_token: m.lease_token,
    duration_ms: Math.round((performance.now() - started) * 10) / 10,
    ...r,
  });
  let status = 0;
  let text: string;
  try {
    const res = await fetch(url, {
      method: "POST",
      headers: {
        authorization: `Bearer ${cfg.WHATSAPP_ACCESS_TOKEN}`,
        "content-type": "application/json",
      },
      body: JSON.stringify(cloudApiRequest(m)),
      signal: AbortSignal.timeout(cfg.WHATSAPP_SEND_TIMEOUT_MS),
    });
    status = res.status;
    text = await res.text();
  } catch (err) {
    if (accepted(status)) return unconfirmed(done, status, String(err));
    const timeout = err instanceof DOMException &&
      (err.name === "TimeoutError" || err.name === "AbortError");
    return done({
      outcome: "retry",
      error_code: timeout ? "timeout" : "network_error",
      error_message: dbText(String(err), 500),
    });
  }
  let json: {
    messages?: { id?: unknown }[];
    error?: { code?: unknown; message?: unknown; error_data?: { details?: unknown } };
  } = {};
  try {
    json = JSON.parse(text);
  } catch {
    // a non-JSON answer is classified by its status below
  }
  const wamid = json?.messages?.[0]?.id;
  // Meta's ids are printable ASCII; any other the queue could not store (a
  // NUL, a lone surrogate, over 256 characters), and a send it cannot record
  // would go out again after each lease: that is no readable id either
  if (accepted(status) && typeof wamid === "string" && WAMID.test(wamid)) {
    return done({ outcome: "sent", wamid });
  }
  if (accepted(status)) return unconfirmed(done, status, text);
  const rawCode = json?.error?.code;
  const code = typeof rawCode === "number"
    ? rawCode
    : typeof rawCode === "string" && /^\d+$/.test(rawCode)
    ? Number(rawCode)
    : undefined;
  const details = json?.error?.error_data?.details;
  const message = [json?.error?.message, details].filter((s) => typeof s === "string").join(": ");
  return done({
    outcome: classify(status, code),
    error_code: code !== undefined ? String(code) : `http_${status}`,
    error_message: dbText(message || text, 2000),
  });
}

/**
 * The outcome of a message whose slot came after the token was refused or
 * the number throttled, with the refusal's outcome and code: SQL pauses the
 * number with the code it is given, and a code-less one would overwrite it.
 */
function notSent(m: ClaimedMessage, refusal: SendResult): SendResult {
  return {
    id: m.id,
    lease_token: m.lease_token,
    outcome: refusal.outcome,
    error_code: refusal.error_code,
    error_message: `not sent: ${PAUSED[refusal.outcome as Refusal]}`,
    duration_ms: 0,
  };
}

/**
 * Pauses before each further try at recording outcomes after database
 * trouble; the last one repeats until half a lease is spent.
 */
const WRITE_RETRY_MS = [50, 200, 500, 1000];

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, Math.max(0, ms)));

export interface DispatchOptions {
  /** stop claiming after this long (ms); in-flight sends then finish */
  budgetMs?: number;
  dispatcherId?: string;
  correlationId?: string;
  config?: WhatsAppConfig;
}

/**
 * Drains due messages until the queue is empty, the budget is spent or the
 * business number is paused. Safe to run many at once, in one isolate or
 * many: all coordination is in SQL.
 */
export async function dispatch(opts: DispatchOptions = {}): Promise<DispatchReport> {
  const cfg = opts.config ?? whatsappConfig();
  const dispatcherId = opts.dispatcherId ?? `dispatcher-${crypto.randomUUID()}`;
  const correlationId = opts.correlationId ?? dispatcherId;
  const business = cfg.WHATSAPP_PHONE_NUMBER_ID!;
  const started = performance.now();
  const deadline = started + (opts.budgetMs ?? cfg.WHATSAPP_DISPATCH_BUDGET_MS);
  const report: DispatchReport = {
    dispatcher_id: dispatcherId,
    claimed: 0,
    sent: 0,
    retried: 0,
    dead_lettered: 0,
    failed: 0,
    stopped: 0,
    throttled: 0,
    ignored: 0,
    paused: null,
    duration_ms: 0,
  };

  const inflight = new Set<Promise<void>>();
  let results: SendResult[] = [];
  // Outcomes are recorded in batches, at most MAX_FLUSHES written at a time
  // (each message is in exactly one batch, so their order does not matter).
  const MAX_FLUSHES = 3;
  // Outcomes wait at most this long (or for 200 of them): fewer, larger
  // batches cost the database much less than one transaction per send.
  const FLUSH_MS = 200;
  const flushes = new Set<Promise<void>>();
  const writing = new Set<Promise<void>>();
  let timer: ReturnType<typeof setTimeout> | undefined;
  let refusal: SendResult | undefined;

  /** One attempt at recording a batch; adds what SQL applied to the report. */
  const complete = async (batch: SendResult[]) => {
    const [row] = await rpc(
      SERVICE_PRINCIPAL,
      correlationId,
      "public.complete_whatsapp_messages",
      {
        dispatcher_id: dispatcherId,
        business_number: business,
        results: batch,
        retry_base_ms: cfg.WHATSAPP_RETRY_BASE_MS,
        pause_seconds: cfg.WHATSAPP_TOKEN_PAUSE_SECONDS,
        throttle_seconds: cfg.WHATSAPP_THROTTLE_PAUSE_SECONDS,
      },
    );
    const counts = row.complete_whatsapp_messages as Record<string, number>;
    for (
      const k of [
        "sent",
        "retried",
        "dead_lettered",
        "failed",
        "stopped",
        "throttled",
        "ignored",
      ] as const
    ) {
      report[k] += counts[k] ?? 0;
    }
  };

  /**
   * Records one batch of outcomes; a failure is logged, never thrown. An
   * outcome not recorded leaves its lease to expire and its message to be
   * claimed again, so a `sent` one would reach the user twice. So a write that
   * failed on database trouble (5xx, a dropped connection) is tried again
   * after a short pause while half a lease is left (SQL applies an outcome
   * once, so a try that did commit before its answer was lost changes
   * nothing), and a batch rejected as invalid input is split in halves until
   * the bad outcome is alone and dropped, so it cannot take its batch-mates
   * with it.
   */
  const writeOutcomes = async (
    batch: SendResult[],
    until = performance.now() + cfg.WHATSAPP_LEASE_SECONDS * 500,
  ): Promise<void> => {
    for (let attempt = 0;; attempt++) {
      let failure: HttpError;
      let raw: unknown;
      try {
        await complete(batch);
        return;
      } catch (err) {
        raw = err;
        failure = toHttpError(err, correlationId);
      }
      const status = failure.status;
      // The caller's input: one outcome is bad.
      if (isInputError(failure) && batch.length > 1) {
        const half = Math.ceil(batch.length / 2);
        // One after the other: the halves hold this write's place among the
        // MAX_FLUSHES.
        await writeOutcomes(batch.slice(0, half), until);
        await writeOutcomes(batch.slice(half), until);
        return;
      }
      const pause = WRITE_RETRY_MS[Math.min(attempt, WRITE_RETRY_MS.length - 1)];
      const retry = status >= 500 && performance.now() + pause < until;
      log(retry ? "warn" : "error", "whatsapp dispatch: recording outcomes failed", {
        correlation_id: correlationId,
        dispatcher_id: dispatcherId,
        count: batch.length,
        ids: batch.map((r) => r.id),
        // what a reconciliation needs when a sent message's outcome is given up
        wamids: retry ? undefined : batch.flatMap((r) => r.wamid ? [`${r.id}:${r.wamid}`] : []),
        status,
        code: failure.code,
        details: failure.details,
        error: String(raw),
        retrying: retry,
      });
      if (!retry) return;
      await sleep(pause);
    }
  };
  const flush = () => {
    if (timer) clearTimeout(timer);
    timer = undefined;
    if (results.length === 0) return;
    const batch = results;
    results = [];
    const p: Promise<void> = (async () => {
      // The check and the taking of a place happen in one synchronous step,
      // so writers woken together never exceed MAX_FLUSHES.
      while (writing.size >= MAX_FLUSHES) await Promise.race(writing);
      const write = writeOutcomes(batch);
      writing.add(write);
      try {
        await write;
      } finally {
        writing.delete(write);
      }
    })();
    flushes.add(p);
    p.finally(() => flushes.delete(p));
  };
  const flushed = async () => {
    flush();
    while (flushes.size > 0) await Promise.all(flushes);
  };

  const record = (r: SendResult) => {
    results.push(r);
    if (r.outcome in PAUSED) refusal ??= r;
    if (results.length >= 200) flush();
    else timer ??= setTimeout(flush, FLUSH_MS);
  };

  /** Sends m at `at` (performance.now() time). */
  const start = (m: ClaimedMessage, at: number) => {
    const p = (async () => {
      const wait = at - performance.now();
      if (wait > 0) await sleep(wait);
      // Once the Cloud API has refused the token or throttled the number,
      // later slots are not spent on it: the message goes back unsent,
      // without using an attempt.
      record(refusal ? notSent(m, refusal) : await sendMessage(cfg, m));
    })();
    inflight.add(p);
    p.finally(() => inflight.delete(p));
  };

  // Slots are on the database clock. The local time of a database instant is
  // that instant plus `skew`; each claim's answer gives an upper bound on it
  // (received - now_ms, larger by however long the answer took to arrive), so
  // the smallest one seen is the best estimate. Anchoring every claim on the
  // same estimate keeps consecutive claims' slots from overlapping or leaving
  // gaps when one answer is slower than another.
  let skew = Infinity;

  const pollMs = Math.min(200, Math.max(20, cfg.WHATSAPP_PAIR_INTERVAL_MS / 10));

  try {
    while (!refusal) {
      const remaining = deadline - performance.now();
      if (remaining <= 0) break;
      const capacity = cfg.WHATSAPP_DISPATCH_CONCURRENCY - inflight.size;
      if (capacity <= 0) {
        await Promise.race(inflight);
        continue;
      }
      const [row] = await rpc(SERVICE_PRINCIPAL, correlationId, "public.claim_whatsapp_messages", {
        dispatcher_id: dispatcherId,
        business_number: business,
        limit: Math.min(capacity, 1000),
        rate_per_second: cfg.WHATSAPP_RATE_LIMIT_PER_SECOND,
        pair_interval_ms: cfg.WHATSAPP_PAIR_INTERVAL_MS,
        lease_seconds: cfg.WHATSAPP_LEASE_SECONDS,
        lookahead_ms: cfg.WHATSAPP_LOOKAHEAD_MS,
      });
      const received = performance.now();
      const claim = row.claim_whatsapp_messages as Claim;
      if (claim.paused) {
        report.paused = claim.pause_reason ?? "paused";
        break;
      }
      report.claimed += claim.messages.length;
      if (claim.messages.length > 0) {
        skew = Math.min(skew, received - claim.now_ms!);
        for (const m of claim.messages) start(m, m.slot_ms + skew);
        // SQL says when half the lookahead's slots are handed out; coming back
        // then keeps claims batched (another dispatcher may claim in between).
        if (claim.wait_ms > 0) await sleep(Math.min(claim.wait_ms, deadline - performance.now()));
        continue;
      }
      if (claim.wait_ms > 0) {
        await sleep(Math.min(claim.wait_ms, remaining));
      } else if (inflight.size > 0) {
        await Promise.race([Promise.race(inflight), sleep(pollMs)]);
      } else if (results.length > 0 || flushes.size > 0) {
        // outcomes not yet recorded may make messages due again (retries)
        await flushed();
      } else if (claim.next_due_ms !== null && claim.next_due_ms < remaining) {
        await sleep(Math.max(pollMs, Math.min(claim.next_due_ms, remaining)));
      } else {
        break;
      }
    }
  } finally {
    // Also when a claim fails: sends already on their way finish and their
    // outcomes are recorded, or their leases would expire and send them twice.
    await Promise.all(inflight);
    await flushed();
  }
  if (refusal && !report.paused) report.paused = REASON[refusal.outcome as Refusal];
  report.duration_ms = Math.round(performance.now() - started);
  log(report.paused ? "warn" : "info", "whatsapp dispatch", {
    correlation_id: correlationId,
    ...report,
  });
  return report;
}

let background: Promise<unknown> | undefined;

/**
 * Starts a short drain in the background (after a webhook or an enqueue)
 * unless one is already running in this isolate or sending is not configured.
 */
export function dispatchSoon(correlationId: string): void {
  let cfg: WhatsAppConfig;
  try {
    cfg = whatsappConfig();
  } catch {
    return;
  }
  if (!canDispatch(cfg) || background) return;
  background = dispatch({ budgetMs: cfg.WHATSAPP_BACKGROUND_BUDGET_MS, correlationId, config: cfg })
    .finally(() => background = undefined);
  runInBackground(background, correlationId);
}
