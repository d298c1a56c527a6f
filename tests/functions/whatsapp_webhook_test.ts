import assert from "node:assert/strict";
import { app } from "../../supabase/functions/whatsapp-webhook/index.ts";
import { signWebhook, whatsappConfig } from "../../shared/whatsapp.ts";
import {
  call,
  createUser,
  dbTest,
  expectError,
  freshDatabase,
  startLocalApi,
  userToken,
} from "../support/harness.ts";
import { configureWhatsApp } from "../support/fake_whatsapp.ts";
import {
  buttonReply,
  errorsWebhook,
  firstWamid,
  imageMessage,
  inbound,
  listReply,
  locationMessage,
  statusUpdate,
  textMessage,
  wamid,
  webhook,
} from "../support/whatsapp_payloads.ts";

const db = await freshDatabase();
const SECRET = "test-app-secret-0123456789abcdef";
const VERIFY = "verify-token-for-tests";
// No access token: the webhook stores events but starts no dispatcher here.
await configureWhatsApp({
  WHATSAPP_APP_SECRET: SECRET,
  WHATSAPP_VERIFY_TOKEN: VERIFY,
  WHATSAPP_ACCESS_TOKEN: undefined,
  WHATSAPP_PHONE_NUMBER_ID: undefined,
});

async function post(payload: unknown, signature?: string | null) {
  const body = typeof payload === "string" ? payload : JSON.stringify(payload);
  const headers: Record<string, string> = { "content-type": "application/json" };
  const sig = signature === undefined ? signWebhook(body, SECRET) : signature;
  if (sig !== null) headers["x-hub-signature-256"] = sig;
  return await call(app, "POST", "/whatsapp-webhook", { body, headers });
}

const count = async (table: string) =>
  Number((await db.sql`select count(*)::int as n from ${db.sql(table)}`)[0].n);

const stored = (id: string) =>
  db.sql`select * from public.whatsapp_inbound_messages where wamid = ${id}`;

function phone(): string {
  return "25078" + String(Math.floor(Math.random() * 1e7)).padStart(7, "0");
}

async function enqueueSent(to: string): Promise<{ id: string; wamid: string }> {
  const w = wamid();
  const [row] = await db.sql`
    insert into public.whatsapp_message_queue (recipient_phone, message_type, message_payload, status, wamid, sent_at)
    values (${"+" + to}, 'text', '{"body": "hi", "preview_url": false}', 'sent', ${w}, now())
    returning id`;
  return { id: row.id, wamid: w };
}

// --- handshake ---------------------------------------------------------------

dbTest("GET handshake echoes the challenge for the right token", async () => {
  const res = await app.request(
    `/whatsapp-webhook?hub.mode=subscribe&hub.verify_token=${VERIFY}&hub.challenge=1158201444`,
  );
  assert.equal(res.status, 200);
  assert.equal(await res.text(), "1158201444");
});

dbTest("GET handshake refuses a wrong token, a wrong mode or no challenge", async () => {
  for (
    const q of [
      `hub.mode=subscribe&hub.verify_token=wrong-token&hub.challenge=1`,
      `hub.mode=subscribe&hub.verify_token=${VERIFY}x&hub.challenge=1`,
      `hub.mode=unsubscribe&hub.verify_token=${VERIFY}&hub.challenge=1`,
      `hub.mode=subscribe&hub.verify_token=${VERIFY}`,
      ``,
    ]
  ) {
    const res = await call(app, "GET", `/whatsapp-webhook?${q}`);
    expectError(res, 403, "verification_failed");
  }
});

// --- inbound messages of every kind --------------------------------------------

dbTest("an inbound text is stored and opens the sender's session window", async () => {
  const from = phone();
  const payload = inbound(from, textMessage("Muraho! I need a ride"), "Aline");
  const res = await post(payload);
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.equal(res.body.messages_stored, 1);
  const id = firstWamid(payload);
  const [row] = await stored(id);
  assert.equal(row.from_phone, "+" + from);
  assert.equal(row.message_type, "text");
  assert.equal(row.text_body, "Muraho! I need a ride");
  assert.equal(row.phone_number_id, "106540352242922");
  const [s] = await db.sql`select * from public.whatsapp_sessions where phone_number = ${
    "+" + from
  }`;
  assert.equal(s.display_name, "Aline");
  assert.equal(Number(s.message_count), 1);
  assert.ok(Date.now() - s.last_inbound_at.getTime() < 60_000);
  assert.ok(s.expires_at.getTime() - s.last_inbound_at.getTime() === 24 * 3600_000);
});

dbTest("interactive replies, location and media are stored with their text", async () => {
  const from = phone();
  const cases: [Record<string, unknown>, string, string | null][] = [
    [buttonReply("confirm_ride", "Confirm"), "interactive", "Confirm"],
    [listReply("moto", "Moto taxi"), "interactive", "Moto taxi"],
    [locationMessage(-1.9536, 30.0606), "location", "Kigali Convention Centre"],
    [imageMessage("my receipt"), "image", "my receipt"],
    [{ type: "sticker", sticker: { id: "2222", mime_type: "image/webp" } }, "sticker", null],
  ];
  for (const [message, type, text] of cases) {
    const payload = inbound(from, message);
    const res = await post(payload);
    assert.equal(res.status, 200);
    const [row] = await stored(firstWamid(payload));
    assert.equal(row.message_type, type);
    assert.equal(row.text_body, text);
    assert.deepEqual(row.payload[type], message[type]);
  }
  const [s] = await db
    .sql`select message_count from public.whatsapp_sessions where phone_number = ${"+" + from}`;
  assert.equal(Number(s.message_count), cases.length);
});

dbTest("a reply keeps the wamid it answers (context)", async () => {
  const from = phone();
  const payload = inbound(from, {
    ...textMessage("yes"),
    context: { from: "15550783881", id: "wamid.original" },
  });
  await post(payload);
  const [row] = await stored(firstWamid(payload));
  assert.equal(row.context_wamid, "wamid.original");
});

// --- delivery and replays ------------------------------------------------------

dbTest("the same webhook delivered 10 times, in parallel, stores one message", async () => {
  const from = phone();
  const payload = inbound(from, textMessage("only once"));
  const body = JSON.stringify(payload);
  const results = await Promise.all(Array.from({ length: 10 }, () => post(body)));
  assert.deepEqual(results.map((r) => r.status), Array(10).fill(200));
  assert.equal(results.reduce((n, r) => n + r.body.messages_stored, 0), 1);
  const id = firstWamid(payload);
  assert.equal((await stored(id)).length, 1);
  const [s] = await db
    .sql`select message_count from public.whatsapp_sessions where phone_number = ${"+" + from}`;
  assert.equal(Number(s.message_count), 1, "the session counts the message once");
});

dbTest("a replayed signature over another body is refused and stores nothing", async () => {
  const original = JSON.stringify(inbound(phone(), textMessage("original")));
  const tampered = inbound(phone(), textMessage("tampered"));
  const before = await count("whatsapp_inbound_wamids");
  const res = await post(tampered, signWebhook(original, SECRET));
  expectError(res, 401, "invalid_signature");
  assert.equal(await count("whatsapp_inbound_wamids"), before);
});

dbTest("forged, missing and malformed signatures get 401 and store nothing", async () => {
  const payload = inbound(phone(), textMessage("forged"));
  const body = JSON.stringify(payload);
  const before = await count("whatsapp_inbound_wamids");
  const good = signWebhook(body, SECRET);
  const cases: [string | null, string][] = [
    [null, "missing_signature"],
    [signWebhook(body, "another-secret-0123456789abcdef"), "invalid_signature"],
    ["sha256=" + "0".repeat(64), "invalid_signature"],
    ["sha256=xyz", "invalid_signature"],
    [good.replace("sha256=", "sha1="), "invalid_signature"],
    [good.slice(0, -2), "invalid_signature"],
    [good + "00", "invalid_signature"],
    ["", "missing_signature"],
  ];
  for (const [sig, code] of cases) {
    const res = await post(body, sig === "" ? null : sig);
    expectError(res, 401, code);
  }
  // a body changed by one byte after signing
  const res = await post(body.replace("forged", "forgeD"), good);
  expectError(res, 401, "invalid_signature");
  assert.equal(await count("whatsapp_inbound_wamids"), before);
});

dbTest("a valid signature over malformed JSON is a 400", async () => {
  const res = await post('{"object": "whatsapp_business_account", "entry": [');
  expectError(res, 400, "invalid_json");
});

dbTest("a body over the size limit is a 413", async () => {
  await configureWhatsApp({ WHATSAPP_WEBHOOK_MAX_BYTES: 2048 });
  try {
    const res = await post(inbound(phone(), textMessage("x".repeat(4000))));
    expectError(res, 413, "payload_too_large");
  } finally {
    await configureWhatsApp({ WHATSAPP_WEBHOOK_MAX_BYTES: undefined });
  }
});

/** A delivery of 4,000-character texts from `from`, as long as fits in `bytes`. */
function bigDelivery(from: string, bytes: number): { body: string; ids: string[] } {
  const message = () => ({
    from,
    id: wamid(),
    timestamp: String(Math.floor(Date.now() / 1000)),
    ...textMessage("m".repeat(4000)),
  });
  const messages = [message()];
  const size = JSON.stringify(webhook({ messages })).length;
  const each = JSON.stringify(messages[0]).length + 1;
  while (size + (messages.length + 1) * each <= bytes) messages.push(message());
  const body = JSON.stringify(webhook({ messages }));
  return { body, ids: messages.map((m) => m.id) };
}

// Meta documents webhook payloads of up to 3 MB: a delivery refused for its
// size is retried for days and never stored.
dbTest("a delivery of Meta's largest size (3 MB) is stored with the default limit", async () => {
  const { body, ids } = bigDelivery(phone(), 3 * 1024 * 1024);
  assert.ok(body.length > 3_000_000 && body.length <= 3 * 1024 * 1024, String(body.length));
  const res = await post(body);
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.equal(res.body.messages_stored, ids.length);
  const [{ n }] = await db.sql`select count(*)::int as n from public.whatsapp_inbound_messages
                               where wamid = any(${ids})`;
  assert.equal(n, ids.length);
});

dbTest("a body over the default limit is a 413 and stores nothing, streamed or not", async () => {
  const limit = whatsappConfig().WHATSAPP_WEBHOOK_MAX_BYTES;
  const { body, ids } = bigDelivery(phone(), limit + 8192);
  assert.ok(body.length > limit);
  expectError(await post(body), 413, "payload_too_large");
  // announced by its length, and streamed without one (chunked): cut off either way
  const bytes = new TextEncoder().encode(body);
  for (const declared of [true, false]) {
    const stream = new ReadableStream<Uint8Array>({
      start(controller) {
        for (let i = 0; i < bytes.length; i += 65536) {
          controller.enqueue(bytes.subarray(i, i + 65536));
        }
        controller.close();
      },
    });
    const headers: Record<string, string> = {
      "content-type": "application/json",
      "x-hub-signature-256": signWebhook(body, SECRET),
    };
    if (declared) headers["content-length"] = String(bytes.length);
    const res = await app.request("/whatsapp-webhook", { method: "POST", headers, body: stream });
    expectError({ status: res.status, body: await res.json() }, 413, "payload_too_large");
  }
  const [{ n }] = await db.sql`select count(*)::int as n from public.whatsapp_inbound_wamids
                               where wamid = any(${ids})`;
  assert.equal(n, 0);
});

dbTest("without an app secret the webhook refuses everything", async () => {
  await configureWhatsApp({ WHATSAPP_APP_SECRET: undefined });
  try {
    const res = await post(inbound(phone(), textMessage("no secret")), "sha256=" + "0".repeat(64));
    expectError(res, 503, "whatsapp_not_configured");
  } finally {
    await configureWhatsApp({ WHATSAPP_APP_SECRET: SECRET });
  }
});

dbTest("unknown event kinds are acknowledged and ignored", async () => {
  const before = await count("whatsapp_inbound_wamids");
  for (
    const payload of [
      { object: "page", entry: [] },
      webhook({ phone_number: "15550783881", event: "VERIFIED_ACCOUNT" }, "account_update"),
      webhook({ something_new: [{ id: "x" }] }),
      { object: "whatsapp_business_account", entry: "not-a-list" },
      [1, 2, 3],
    ]
  ) {
    const res = await post(payload);
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.equal(res.body.received, true);
  }
  assert.equal(await count("whatsapp_inbound_wamids"), before);
});

dbTest("errors Meta reports are recorded as metrics", async () => {
  const res = await post(errorsWebhook(130429, "Rate limit hit"));
  assert.equal(res.status, 200);
  const [m] = await db.sql`select * from public.system_metrics
                           where metric_name = 'whatsapp.webhook.error' and tags ->> 'error_code' = '130429'`;
  assert.equal(m.tags.title, "Rate limit hit");
  assert.equal(m.correlation_id, res.headers.get("x-correlation-id"));
});

// --- statuses -----------------------------------------------------------------

dbTest("statuses move a message forward only: a late delivered never overwrites read", async () => {
  const to = phone();
  const m = await enqueueSent(to);
  for (const s of ["delivered", "read", "delivered", "sent"] as const) {
    const res = await post(statusUpdate(m.wamid, s, to));
    assert.equal(res.status, 200);
  }
  const [row] = await db.sql`select * from public.whatsapp_message_queue where id = ${m.id}`;
  assert.equal(row.status, "read");
  assert.ok(row.delivered_at && row.read_at);
  const events = await db
    .sql`select status from public.whatsapp_message_statuses where wamid = ${m.wamid} order by 1`;
  assert.deepEqual(events.map((e) => e.status), ["delivered", "read", "sent"]);
});

dbTest("a failed status keeps Meta's error code; it cannot undo a delivery", async () => {
  const to = phone();
  const m = await enqueueSent(to);
  await post(statusUpdate(m.wamid, "failed", to, { code: 131026, title: "Message undeliverable" }));
  const [row] = await db.sql`select * from public.whatsapp_message_queue where id = ${m.id}`;
  assert.equal(row.status, "failed");
  assert.equal(row.error_code, "131026");
  assert.match(row.last_error, /undeliverable/);
  const [metric] = await db.sql`select * from public.system_metrics
    where metric_name = 'whatsapp.message.failed' and tags ->> 'message_id' = ${m.id}`;
  assert.equal(metric.tags.source, "webhook");

  const d = await enqueueSent(to);
  await post(statusUpdate(d.wamid, "delivered", to));
  await post(statusUpdate(d.wamid, "failed", to, { code: 131000, title: "Something went wrong" }));
  const [after] = await db.sql`select status from public.whatsapp_message_queue where id = ${d.id}`;
  assert.equal(after.status, "delivered");
});

dbTest("a failed status for the pair limit sends the message again after a backoff", async () => {
  const to = phone();
  const m = await enqueueSent(to);
  const res = await post(
    statusUpdate(m.wamid, "failed", to, { code: 131056, title: "Pair rate limit hit" }),
  );
  assert.equal(res.body.statuses_applied, 1);
  const [row] = await db.sql`select status, wamid, error_code, visible_at > now() as later
                             from public.whatsapp_message_queue where id = ${m.id}`;
  assert.deepEqual(row, { status: "pending", wamid: null, error_code: "131056", later: true });
  const [metric] = await db.sql`select tags from public.system_metrics
    where metric_name = 'whatsapp.message.retry' and tags ->> 'message_id' = ${m.id}`;
  assert.equal(metric?.tags.source, "webhook");
});

dbTest("several statuses in one delivery apply the furthest one", async () => {
  const to = phone();
  const m = await enqueueSent(to);
  const payload = webhook({
    statuses: ["read", "sent", "delivered"].map((status) => ({
      id: m.wamid,
      status,
      timestamp: String(Math.floor(Date.now() / 1000)),
      recipient_id: to,
    })),
  });
  const res = await post(payload);
  assert.equal(res.body.statuses_applied, 1);
  const [row] = await db.sql`select status from public.whatsapp_message_queue where id = ${m.id}`;
  assert.equal(row.status, "read");
});

// --- dispatch endpoint auth ----------------------------------------------------

dbTest("POST /dispatch needs the service role", async () => {
  expectError(
    await call(app, "POST", "/whatsapp-webhook/dispatch", { body: {} }),
    401,
    "missing_token",
  );
  const uid = await createUser(db);
  const res = await call(app, "POST", "/whatsapp-webhook/dispatch", {
    token: await userToken(uid),
    body: {},
  });
  expectError(res, 403, "forbidden");
});

// A delivery the database would refuse is one Meta retries for days, and the
// good messages in it would never be stored: what does not fit is mended.
dbTest("fields the database cannot take are mended, and the delivery is stored", async () => {
  const good = () => ({
    from: "250788123450",
    id: wamid(),
    timestamp: "1700000000",
    ...textMessage("ok"),
  });
  const odd = {
    long_context: { ...good(), context: { id: "x".repeat(300) } },
    nul_in_text: { ...good(), ...textMessage("a\u0000b") },
    // half of a surrogate pair, sent escaped ("\ud83d"): jsonb refuses it
    lone_surrogate: { ...good(), ...textMessage("x\ud83d") },
    lone_surrogate_elsewhere: { ...good(), extra: { note: "\udc00" } },
    far_timestamp: { ...good(), timestamp: "999999999999" },
  };
  const mate = good();
  const res = await post(webhook({ messages: [mate, ...Object.values(odd)] }));
  assert.equal(res.status, 200, JSON.stringify(res.body));
  const rows = await db.sql`select wamid, text_body, context_wamid, sent_at <= now() as past
                            from public.whatsapp_inbound_messages
                            where wamid = any(${[
    mate.id,
    ...Object.values(odd).map((m) => m.id),
  ]})`;
  const by = new Map(rows.map((r) => [r.wamid, r]));
  assert.ok(by.has(mate.id), "the good batch-mate is stored");
  assert.equal(
    by.get(odd.long_context.id)?.context_wamid,
    null,
    "a context id too long is dropped",
  );
  assert.equal(by.get(odd.nul_in_text.id)?.text_body, "a\uFFFDb", "a NUL becomes U+FFFD");
  assert.equal(
    by.get(odd.lone_surrogate.id)?.text_body,
    "x\uFFFD",
    "a lone surrogate becomes U+FFFD",
  );
  assert.ok(by.has(odd.lone_surrogate_elsewhere.id), "so does one in a field nothing reads");
  assert.equal(by.get(odd.far_timestamp.id)?.past, true, "a time past tomorrow is taken as now");

  const longId = { ...good() };
  const res2 = await post({
    object: "whatsapp_business_account",
    entry: [{
      id: "1",
      changes: [{
        field: "messages",
        value: { metadata: { phone_number_id: "9".repeat(80) }, messages: [longId] },
      }],
    }],
  });
  assert.equal(res2.status, 200, JSON.stringify(res2.body));
  const [stored] = await db.sql`select phone_number_id from public.whatsapp_inbound_messages
                                where wamid = ${longId.id}`;
  assert.equal(stored.phone_number_id, null, "a phone_number_id too long is dropped");
});

// Deeper than any stack: the message is kept without its body, and the rest
// of the delivery is stored (with or without a NUL elsewhere, which makes
// every string of the delivery be copied).
dbTest("a message nested thousands of levels deep is kept without its body", async () => {
  for (const nul of ["", "\u0000"]) {
    const mate = {
      from: "250788123450",
      id: wamid(),
      timestamp: "1700000000",
      ...textMessage(`ok${nul}`),
    };
    const deep = {
      from: "250788123450",
      id: wamid(),
      timestamp: "1700000000",
      type: "text",
      text: { body: "DEEP" },
    };
    const depth = 10_000;
    const body = JSON.stringify(webhook({ messages: [mate, deep] }))
      .replace('"DEEP"', "[".repeat(depth) + "]".repeat(depth));
    const res = await post(body);
    assert.equal(res.status, 200, JSON.stringify(res.body));
    const rows = await db.sql`select wamid, payload from public.whatsapp_inbound_messages
                              where wamid in (${mate.id}, ${deep.id})`;
    const by = new Map(rows.map((r) => [r.wamid, r.payload]));
    assert.ok(by.has(mate.id), "the batch-mate is stored");
    assert.deepEqual(by.get(deep.id), {
      id: deep.id,
      type: "text",
      truncated: "nested deeper than 100 levels",
    });
  }
});

// --- deliveries of more events than one ingest call takes -----------------------

/** Posts a signed body over real HTTP, as Meta does. */
async function postHttp(url: string, body: string) {
  const res = await fetch(`${url}/functions/v1/whatsapp-webhook`, {
    method: "POST",
    headers: {
      "content-type": "application/json",
      "x-hub-signature-256": signWebhook(body, SECRET),
    },
    body,
  });
  return { status: res.status, body: await res.json() };
}

/**
 * A delivery of 6,110 statuses and 50 messages from 5 senders with their
 * contacts (6,165 events; public.ingest_whatsapp_events takes 5,000 a call): 2,000 sent
 * messages reported delivered and then read, 10 more reported failed early in
 * the delivery and delivered at its end, 2,090 statuses of messages the queue
 * does not know.
 */
async function manyEvents(tag: string) {
  const to = phone();
  const known = await db.sql`
    insert into public.whatsapp_message_queue (recipient_phone, message_type, message_payload, status, wamid, sent_at)
    select ${"+" + to}, 'text', '{"body": "hi", "preview_url": false}', 'sent',
           ${`wamid.${tag}-`} || g, now()
    from generate_series(1, 2010) g
    returning id, wamid`;
  const wamids = known.map((r) => r.wamid as string);
  const [readOnes, flipped] = [wamids.slice(0, 2000), wamids.slice(2000)];
  const ts = String(Math.floor(Date.now() / 1000));
  const status = (id: string, s: string, errors?: unknown) => ({
    id,
    status: s,
    timestamp: ts,
    recipient_id: to,
    ...(errors ? { errors } : {}),
  });
  const undeliverable = [{ code: 131026, title: "Message undeliverable" }];
  const statuses = [
    ...flipped.map((w) => status(w, "failed", undeliverable)),
    ...readOnes.map((w) => status(w, "delivered")),
    ...Array.from({ length: 2090 }, (_, i) => status(`wamid.${tag}-unknown-${i}`, "sent")),
    ...readOnes.map((w) => status(w, "read")),
    ...flipped.map((w) => status(w, "delivered")),
  ];
  const senders = Array.from({ length: 5 }, () => phone());
  const messages = Array.from({ length: 50 }, (_, i) => ({
    from: senders[i % 5],
    id: wamid(),
    timestamp: ts,
    ...textMessage(`message ${i}`),
  }));
  const contacts = senders.map((s, i) => ({ profile: { name: `Sender ${i}` }, wa_id: s }));
  const body = JSON.stringify(webhook({ contacts, messages, statuses }));
  return { body, to, known, readOnes, flipped, senders, messages, statuses };
}

/** What a delivery from manyEvents left in the database. */
async function storedOf(d: Awaited<ReturnType<typeof manyEvents>>) {
  const [{ inbound }] = await db.sql`select count(*)::int as inbound
    from public.whatsapp_inbound_messages where wamid = any(${d.messages.map((m) => m.id)})`;
  const [{ events }] = await db.sql`select count(*)::int as events
    from public.whatsapp_message_statuses where wamid = any(${[
    ...new Set(d.statuses.map((s) => s.id)),
  ]})`;
  const queue = await db.sql`select status, count(*)::int as n from public.whatsapp_message_queue
    where id = any(${d.known.map((r) => r.id)}) group by status order by status`;
  const sessions = await db.sql`select phone_number, display_name, message_count::int as n
    from public.whatsapp_sessions where phone_number = any(${d.senders.map((s) => "+" + s)})
    order by phone_number`;
  return { inbound, events, queue: [...queue], sessions: [...sessions] };
}

/** What a delivery from manyEvents should leave, stored once whatever the calls. */
function wantStored(d: Awaited<ReturnType<typeof manyEvents>>) {
  return {
    inbound: 50,
    events: 6110,
    queue: [{ status: "delivered", n: 10 }, { status: "read", n: 2000 }],
    sessions: d.senders.map((s, i) => ({
      phone_number: "+" + s,
      display_name: `Sender ${i}`,
      n: 10,
    })).sort((a, b) => a.phone_number < b.phone_number ? -1 : 1),
  };
}

// Meta refuses nothing it signed for its count, and retries a refused delivery
// for days before dropping it: one within the byte limit is stored whole,
// however many events it holds, each once.
dbTest("a delivery of more events than one ingest call takes is stored, each once", async () => {
  const d = await manyEvents("bulk");
  assert.ok(d.body.length < whatsappConfig().WHATSAPP_WEBHOOK_MAX_BYTES, String(d.body.length));
  const api = await startLocalApi();
  try {
    const res = await postHttp(api.url, d.body);
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.equal(res.body.messages_received, 50);
    assert.equal(res.body.messages_stored, 50);
    assert.equal(res.body.statuses_received, 6110);
    // one move per known message: a message's statuses are applied together,
    // as in a single call
    assert.equal(res.body.statuses_applied, 2010);
    // delivered after failed in the same delivery: the furthest wins
    assert.deepEqual(await storedOf(d), wantStored(d));

    // Meta's retry of the same delivery: nothing new
    const again = await postHttp(api.url, d.body);
    assert.equal(again.status, 200, JSON.stringify(again.body));
    assert.equal(again.body.messages_stored, 0);
    assert.equal(again.body.duplicates, 50);
    assert.equal(again.body.statuses_applied, 0);
    assert.deepEqual(await storedOf(d), wantStored(d));
  } finally {
    await api.close();
  }
});

// Each part of a large delivery is its own transaction: one that fails leaves
// the parts before it stored and answers 5xx, so Meta retries the delivery,
// and the retry stores the rest and nothing twice.
dbTest(
  "a large delivery that fails part way is a 5xx, and its retry completes it once",
  async () => {
    const d = await manyEvents("partial");
    // a fault the database raises on the last status of a message the queue
    // does not know (the delivery's last part)
    const last = "wamid.partial-unknown-2089";
    await db.sql.unsafe(`
    create function public.test_fail_status() returns trigger language plpgsql as $$
    begin
      if new.wamid = '${last}' then raise exception 'injected fault'; end if;
      return new;
    end $$;
    grant execute on function public.test_fail_status() to service_role;
    create trigger test_fail_status before insert on public.whatsapp_message_statuses
      for each row execute function public.test_fail_status();`);
    const api = await startLocalApi();
    try {
      const res = await postHttp(api.url, d.body);
      assert.ok(res.status >= 500, JSON.stringify(res.body));
      const partly = await storedOf(d);
      assert.equal(partly.inbound, 50, "the first part (messages first) was stored");
      assert.ok(partly.events > 0 && partly.events < 6110, String(partly.events));

      await db.sql.unsafe(`drop trigger test_fail_status on public.whatsapp_message_statuses;
                         drop function public.test_fail_status();`);
      const retried = await postHttp(api.url, d.body);
      assert.equal(retried.status, 200, JSON.stringify(retried.body));
      assert.equal(retried.body.messages_stored, 0);
      assert.deepEqual(await storedOf(d), wantStored(d));
    } finally {
      await api.close();
      await db.sql.unsafe(
        `drop trigger if exists test_fail_status on public.whatsapp_message_statuses;
                         drop function if exists public.test_fail_status();`,
      );
    }
  },
);
