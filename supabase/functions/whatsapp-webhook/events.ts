// Flattens a Cloud API webhook (`entry[].changes[].value`) into the rows
// public.ingest_whatsapp_events takes. Meta's payloads are treated as
// untrusted even after the signature check: every field is type-checked and
// anything unrecognised is counted as ignored, never trusted. What the
// database would refuse is mended here (cut to its column's length, NULs
// replaced, impossible times taken as now): a refused delivery is one Meta
// retries for days, and the good messages in it would never be stored.

import { dbText } from "../../../shared/db.ts";
import { jsonDepth, MAX_JSON_DEPTH } from "../../../shared/schemas.ts";

export interface InboundMessage {
  wamid: string;
  from_phone: string;
  message_type: string;
  sent_at: string;
  phone_number_id: string | null;
  text_body: string | null;
  context_wamid: string | null;
  payload: Record<string, unknown>;
}

export interface StatusEvent {
  wamid: string;
  status: string;
  occurred_at: string;
  recipient_phone: string | null;
  error_code: string | null;
  error_message: string | null;
}

export interface Contact {
  phone: string;
  display_name: string;
}

export interface WebhookError {
  code: string;
  title: string | null;
  details: string | null;
}

export interface Events {
  messages: InboundMessage[];
  statuses: StatusEvent[];
  contacts: Contact[];
  errors: WebhookError[];
  ignored: number;
}

type Obj = Record<string, unknown>;

const isObj = (v: unknown): v is Obj => typeof v === "object" && v !== null && !Array.isArray(v);
const arr = (v: unknown): unknown[] => (Array.isArray(v) ? v : []);
const str = (v: unknown): string | null => (typeof v === "string" && v.length > 0 ? v : null);
/** A string if it fits a column of `max` characters, else nothing. */
const within = (v: string | null, max: number): string | null =>
  v !== null && v.length <= max ? v : null;

/**
 * Postgres text and jsonb hold no NUL and no lone UTF-16 surrogate (JSON can
 * escape half of a pair, "\ud83d"): each becomes U+FFFD, in every string of a
 * value, keys included.
 */
function scrub<T>(value: T): T {
  if (typeof value === "string") return value.replaceAll("\u0000", "\uFFFD").toWellFormed() as T;
  if (Array.isArray(value)) return value.map(scrub) as T;
  if (isObj(value)) {
    return Object.fromEntries(
      Object.entries(value).map(([k, v]) => [scrub(k), scrub(v)]),
    ) as T;
  }
  return value;
}

/**
 * Whether a raw JSON body may decode to a NUL or a lone surrogate: JSON carries
 * either only as a \u escape (raw bytes that are not UTF-8 decode to U+FFFD).
 */
export function mayHoldUnstorable(raw: string): boolean {
  return /\\u(0000|[dD][89a-fA-F])/.test(raw);
}

/** Meta sends wa_ids as digits without '+'; the schema stores E.164. */
export function toE164(waId: unknown): string | null {
  const s = str(waId)?.replace(/^\+/, "");
  return s && /^[1-9][0-9]{6,14}$/.test(s) ? `+${s}` : null;
}

/** Unix seconds (Meta's timestamps are strings) to ISO 8601; none, or one past tomorrow, is now. */
function isoTime(ts: unknown): string {
  const n = typeof ts === "string" && /^\d{1,12}$/.test(ts)
    ? Number(ts)
    : typeof ts === "number"
    ? ts
    : NaN;
  const now = Date.now();
  return Number.isFinite(n) && n > 0 && n * 1000 < now + 86_400_000
    ? new Date(n * 1000).toISOString()
    : new Date(now).toISOString();
}

function errorOf(e: unknown): WebhookError | null {
  if (!isObj(e) || (typeof e.code !== "number" && typeof e.code !== "string")) return null;
  const data = isObj(e.error_data) ? e.error_data : {};
  return {
    code: String(e.code),
    title: str(e.title) ?? str(e.message),
    details: str(data.details),
  };
}

/** The human-readable part of an inbound message, by its type. */
function textOf(type: string, m: Obj): string | null {
  const part = isObj(m[type]) ? (m[type] as Obj) : {};
  switch (type) {
    case "text":
      return str(part.body);
    case "interactive": {
      const reply = isObj(part.button_reply)
        ? part.button_reply
        : isObj(part.list_reply)
        ? part.list_reply
        : {};
      return str((reply as Obj).title);
    }
    case "button":
      return str(part.text);
    case "location":
      return str(part.name) ?? str(part.address);
    case "image":
    case "video":
    case "document":
      return str(part.caption);
    case "reaction":
      return str(part.emoji);
    default:
      return null;
  }
}

function message(m: unknown, phoneNumberId: string | null): InboundMessage | null {
  if (!isObj(m)) return null;
  const wamid = str(m.id);
  const from = toE164(m.from);
  const type = str(m.type);
  if (!wamid || !from || !type || !/^[a-z_]{1,32}$/.test(type) || wamid.length > 256) return null;
  return {
    wamid,
    from_phone: from,
    message_type: type,
    sent_at: isoTime(m.timestamp),
    phone_number_id: phoneNumberId,
    text_body: textOf(type, m),
    context_wamid: isObj(m.context) ? within(str(m.context.id), 256) : null,
    // A message nested deeper than the API takes is kept without its body:
    // copying or encoding it would recurse past the stack, and the delivery
    // (with its good messages) would fail on every retry.
    payload: jsonDepth(m) > MAX_JSON_DEPTH
      ? { id: wamid, type, truncated: `nested deeper than ${MAX_JSON_DEPTH} levels` }
      : m,
  };
}

function status(s: unknown): StatusEvent | null {
  if (!isObj(s)) return null;
  const wamid = within(str(s.id), 256);
  const value = str(s.status);
  if (!wamid || !value) return null;
  const err = arr(s.errors).map(errorOf).find((e) => e !== null) ?? null;
  return {
    wamid,
    status: value,
    occurred_at: isoTime(s.timestamp),
    recipient_phone: toE164(s.recipient_id),
    error_code: err ? dbText(err.code, 64) : null,
    error_message: err ? dbText([err.title, err.details].filter(Boolean).join(": "), 2000) : null,
  };
}

/**
 * Walks every entry and change; unknown objects and fields are ignored.
 * `mayNeedScrub`: whether the raw body may hold what the database refuses
 * (see mayHoldUnstorable); without it the rows need no copy (the common case).
 */
export function parseWebhook(body: unknown, mayNeedScrub = true): Events {
  const clean = mayNeedScrub ? scrub : <T>(value: T): T => value;
  const out: Events = { messages: [], statuses: [], contacts: [], errors: [], ignored: 0 };
  if (!isObj(body) || body.object !== "whatsapp_business_account") {
    out.ignored++;
    return out;
  }
  for (const entry of arr(body.entry)) {
    for (const change of arr(isObj(entry) ? entry.changes : undefined)) {
      if (!isObj(change) || change.field !== "messages" || !isObj(change.value)) {
        out.ignored++;
        continue;
      }
      const value = change.value;
      const phoneNumberId = isObj(value.metadata)
        ? within(str(value.metadata.phone_number_id), 64)
        : null;
      for (const c of arr(value.contacts)) {
        const phone = isObj(c) ? toE164(c.wa_id) : null;
        const name = isObj(c) && isObj(c.profile) ? str(c.profile.name) : null;
        if (phone && name) out.contacts.push(clean({ phone, display_name: dbText(name, 256) }));
      }
      for (const m of arr(value.messages)) {
        const parsed = message(m, phoneNumberId);
        if (parsed) out.messages.push(clean(parsed));
        else out.ignored++;
        if (isObj(m)) {
          for (const e of arr(m.errors)) errorOf(e) && out.errors.push(clean(errorOf(e)!));
        }
      }
      for (const s of arr(value.statuses)) {
        const parsed = status(s);
        if (parsed) out.statuses.push(clean(parsed));
        else out.ignored++;
      }
      for (const e of arr(value.errors)) {
        const parsed = errorOf(e);
        if (parsed) out.errors.push(clean(parsed));
      }
    }
  }
  return out;
}

/** The per-call cap of public.ingest_whatsapp_events (messages, statuses, contacts and errors together). */
export const INGEST_MAX_EVENTS = 5000;

/** The rows of one ingest call. */
export type Batch = Omit<Events, "ignored">;

/**
 * Splits a delivery into ingest calls of at most `max` rows: Meta signs
 * deliveries of any count within the byte limit, and one it is refused is
 * retried for days and then dropped. Contacts go first (a sender's session
 * gets its name as it is made), errors last; a message's statuses stay in one
 * call, so the furthest of them wins as it would in a single call (only a
 * message with more than `max` statuses, all of them repeats, is cut).
 */
export function batches(events: Events, max = INGEST_MAX_EVENTS): Batch[] {
  const out: Batch[] = [];
  let batch: Batch = { messages: [], statuses: [], contacts: [], errors: [] };
  let size = 0;
  /** Starts a new batch unless `n` more rows fit in this one. */
  const room = (n: number) => {
    if (size > 0 && size + n > max) {
      out.push(batch);
      batch = { messages: [], statuses: [], contacts: [], errors: [] };
      size = 0;
    }
  };
  const add = <K extends keyof Batch>(kind: K, row: Batch[K][number]) => {
    room(1);
    (batch[kind] as Batch[K][number][]).push(row);
    size++;
  };
  for (const c of events.contacts) add("contacts", c);
  for (const m of events.messages) add("messages", m);
  const byMessage = Map.groupBy(events.statuses, (s) => s.wamid);
  for (const statuses of byMessage.values()) {
    room(statuses.length);
    for (const s of statuses) add("statuses", s);
  }
  for (const e of events.errors) add("errors", e);
  if (size > 0) out.push(batch);
  return out;
}
