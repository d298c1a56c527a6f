import assert from "node:assert/strict";
import { createClient } from "@supabase/supabase-js";
import { app } from "../../supabase/functions/whatsapp/index.ts";
import {
  anonToken,
  call,
  createUser,
  dbTest,
  expectError,
  freshDatabase,
  serviceToken,
  startLocalApi,
  userToken,
} from "../support/harness.ts";
import { configureWhatsApp } from "../support/fake_whatsapp.ts";

const db = await freshDatabase();
// No Cloud API credentials: enqueueing starts no background dispatcher here.
await configureWhatsApp({ WHATSAPP_ACCESS_TOKEN: undefined, WHATSAPP_PHONE_NUMBER_ID: undefined });

const ALICE = "+250788555001";
const BOB = "+250788555002";

async function enqueue(body: Record<string, unknown>, headers: Record<string, string> = {}) {
  return await call(app, "POST", "/whatsapp/messages", {
    token: await serviceToken(),
    body,
    headers,
  });
}

const queueCount = async () =>
  Number((await db.sql`select count(*)::int as n from public.whatsapp_message_queue`)[0].n);

dbTest("the service role enqueues a message", async () => {
  const res = await enqueue(
    {
      recipient_phone: ALICE,
      message_type: "text",
      message_payload: { text: "Hello!" },
      priority: 3,
    },
    { "x-correlation-id": "enqueue-corr-1" },
  );
  assert.equal(res.status, 201, JSON.stringify(res.body));
  assert.equal(res.body.status, "pending");
  assert.equal(res.body.priority, 3);
  assert.equal(res.body.correlation_id, "enqueue-corr-1");
  assert.deepEqual(res.body.message_payload, { body: "Hello!", preview_url: false });
  assert.equal(res.body.locked_by, undefined, "lease internals are not exposed");
});

dbTest("Idempotency-Key: a retry returns the original; other content is a 409", async () => {
  const body = {
    recipient_phone: BOB,
    message_type: "template",
    message_payload: { name: "otp", language: "en" },
  };
  const first = await enqueue(body, { "idempotency-key": "otp-bob-1" });
  assert.equal(first.status, 201);
  const again = await enqueue(body, { "idempotency-key": "otp-bob-1" });
  assert.equal(again.status, 200);
  assert.equal(again.headers.get("idempotent-replayed"), "true");
  assert.equal(again.body.id, first.body.id);
  const other = await enqueue({ ...body, message_payload: { name: "otp", language: "fr" } }, {
    "idempotency-key": "otp-bob-1",
  });
  expectError(other, 409, "idempotency_key_conflict");
  // concurrent first requests with one key create one message
  const results = await Promise.all(
    Array.from({ length: 8 }, () => enqueue(body, { "idempotency-key": "otp-bob-2" })),
  );
  assert.equal(new Set(results.map((r) => r.body.id)).size, 1);
  assert.equal(results.filter((r) => r.status === 201).length, 1);
});

dbTest(
  "a text's preview_url is kept in the Cloud API's nested form, and must be a boolean",
  async () => {
    const ok = await enqueue({
      recipient_phone: ALICE,
      message_type: "text",
      message_payload: { text: { body: "Track it: https://easymo.rw/t/42", preview_url: true } },
    });
    assert.equal(ok.status, 201, JSON.stringify(ok.body));
    assert.deepEqual(ok.body.message_payload, {
      body: "Track it: https://easymo.rw/t/42",
      preview_url: true,
    });
    const before = await queueCount();
    for (const preview_url of ["true", 1, null, {}]) {
      const res = await enqueue({
        recipient_phone: ALICE,
        message_type: "text",
        message_payload: { text: { body: "x", preview_url } },
      });
      const err = expectError(res, 400, "invalid_payload");
      assert.deepEqual(err.details, {
        field: "message_payload.text.preview_url",
        reason: "must be a boolean",
      });
    }
    assert.equal(await queueCount(), before, "nothing written");
  },
);

dbTest("bad input is a 400 with a stable code and writes nothing", async () => {
  const before = await queueCount();
  const cases: [Record<string, unknown>, string][] = [
    [
      { recipient_phone: "0788555001", message_type: "text", message_payload: { text: "x" } },
      "invalid_phone_number",
    ],
    [
      { recipient_phone: ALICE, message_type: "text", message_payload: { text: "" } },
      "invalid_payload",
    ],
    [{
      recipient_phone: ALICE,
      message_type: "location",
      message_payload: { latitude: 100, longitude: 0 },
    }, "invalid_payload"],
    [{ recipient_phone: ALICE, message_type: "fax", message_payload: {} }, "invalid_request"],
    [
      { recipient_phone: ALICE, message_type: "text", message_payload: { text: "x" }, priority: 0 },
      "invalid_request",
    ],
    [
      { recipient_phone: ALICE, message_type: "text", message_payload: { text: "x" }, extra: 1 },
      "invalid_request",
    ],
  ];
  for (const [body, code] of cases) {
    const res = await enqueue(body);
    const err = expectError(res, 400, code);
    if (code === "invalid_payload") assert.match(JSON.stringify(err.details), /message_payload\./);
  }
  expectError(
    await enqueue(
      { recipient_phone: ALICE, message_type: "text", message_payload: { text: "x" } },
      {
        "idempotency-key": "has spaces",
      },
    ),
    400,
    "invalid_idempotency_key",
  );
  assert.equal(await queueCount(), before);
});

dbTest("users and anon cannot enqueue", async () => {
  const uid = await createUser(db);
  const body = { recipient_phone: ALICE, message_type: "text", message_payload: { text: "x" } };
  const user = await call(app, "POST", "/whatsapp/messages", { token: await userToken(uid), body });
  expectError(user, 403, "forbidden");
  const anon = await call(app, "POST", "/whatsapp/messages", { token: await anonToken(), body });
  expectError(anon, 401, "login_required");
  expectError(await call(app, "POST", "/whatsapp/messages", { body }), 401, "missing_token");
});

dbTest("a user reads their own message, never another's", async () => {
  const toAlice = await enqueue({
    recipient_phone: ALICE,
    message_type: "text",
    message_payload: { text: "a" },
  });
  const toBob = await enqueue({
    recipient_phone: BOB,
    message_type: "text",
    message_payload: { text: "b" },
  });
  const alice = await userToken(await createUser(db, ALICE.slice(1)), { phone: ALICE.slice(1) });
  const own = await call(app, "GET", `/whatsapp/messages/${toAlice.body.id}`, { token: alice });
  assert.equal(own.status, 200);
  assert.equal(own.body.id, toAlice.body.id);
  expectError(
    await call(app, "GET", `/whatsapp/messages/${toBob.body.id}`, { token: alice }),
    404,
    "not_found",
  );
  expectError(
    await call(app, "GET", `/whatsapp/messages/not-a-number`, { token: alice }),
    400,
    "invalid_request",
  );
  const svc = await call(app, "GET", `/whatsapp/messages/${toBob.body.id}`, {
    token: await serviceToken(),
  });
  assert.equal(svc.body.recipient_phone, BOB);
});

dbTest("cancel: pending messages only, service role only", async () => {
  const m = await enqueue({
    recipient_phone: ALICE,
    message_type: "text",
    message_payload: { text: "cancel me" },
  });
  const alice = await userToken(await createUser(db), { phone: ALICE.slice(1) });
  expectError(
    await call(app, "POST", `/whatsapp/messages/${m.body.id}/cancel`, { token: alice }),
    403,
    "forbidden",
  );
  const res = await call(app, "POST", `/whatsapp/messages/${m.body.id}/cancel`, {
    token: await serviceToken(),
  });
  assert.equal(res.status, 200);
  assert.equal(res.body.status, "cancelled");
  await db
    .sql`update public.whatsapp_message_queue set status = 'sent', wamid = 'wamid.c1' where id = ${m.body.id}`;
  const late = await call(app, "POST", `/whatsapp/messages/${m.body.id}/cancel`, {
    token: await serviceToken(),
  });
  expectError(late, 409, "message_not_cancellable");
  const missing = await call(app, "POST", `/whatsapp/messages/999999999/cancel`, {
    token: await serviceToken(),
  });
  expectError(missing, 404, "message_not_found");
});

dbTest("sessions: own for a user, all (paginated) for the service role", async () => {
  await db.sql`select public.update_whatsapp_session_activity(${ALICE}, true, now())`;
  await db.sql`select public.update_whatsapp_session_activity(${BOB}, true)`;
  const alice = await userToken(await createUser(db), { phone: ALICE.slice(1) });
  const own = await call(app, "GET", "/whatsapp/sessions", { token: alice });
  assert.equal(own.status, 200);
  assert.deepEqual(own.body.data.map((s: { phone_number: string }) => s.phone_number), [ALICE]);
  assert.equal(own.body.data[0].window_open, true);

  const token = await serviceToken();
  const seen: string[] = [];
  let cursor: string | null = null;
  do {
    const page: {
      status: number;
      body: { data: { phone_number: string }[]; next_cursor: string | null };
    } = await call(app, "GET", `/whatsapp/sessions?limit=1${cursor ? `&cursor=${cursor}` : ""}`, {
      token,
    });
    assert.equal(page.status, 200);
    seen.push(...page.body.data.map((s) => s.phone_number));
    cursor = page.body.next_cursor;
  } while (cursor);
  // Page by page, every session exactly once, in phone order.
  const all = await db.sql`select phone_number from public.whatsapp_sessions order by phone_number`;
  assert.deepEqual(seen, all.map((r) => r.phone_number));
  assert.ok(seen.includes(ALICE) && seen.includes(BOB));
  expectError(
    await call(app, "GET", "/whatsapp/sessions?cursor=bogus", { token }),
    400,
    "invalid_cursor",
  );
  expectError(
    await call(app, "GET", "/whatsapp/sessions", { token: await anonToken() }),
    401,
    "login_required",
  );
});

dbTest("metrics: queue depth and in flight, for the service role", async () => {
  const res = await call(app, "GET", "/whatsapp/metrics", { token: await serviceToken() });
  assert.equal(res.status, 200);
  const [{ n }] = await db
    .sql`select count(*)::int as n from public.whatsapp_message_queue where status = 'pending'`;
  assert.equal(res.body.queue_depth, n);
  assert.equal(typeof res.body.send_rate_per_second, "number");
  assert.equal(res.body.in_flight, 0);
  const uid = await createUser(db);
  expectError(
    await call(app, "GET", "/whatsapp/metrics", { token: await userToken(uid) }),
    403,
    "forbidden",
  );
});

dbTest("over HTTP with supabase-js functions.invoke, like a backend", async () => {
  const api = await startLocalApi();
  try {
    const supabase = createClient(api.url, await serviceToken(), {
      auth: { persistSession: false },
    });
    const { data, error } = await supabase.functions.invoke("whatsapp/messages", {
      body: {
        recipient_phone: ALICE,
        message_type: "template",
        message_payload: { name: "hi", language: "en" },
      },
    });
    assert.equal(error, null);
    assert.equal(data.status, "pending");
    const { data: metrics } = await supabase.functions.invoke("whatsapp/metrics", {
      method: "GET",
    });
    assert.ok(metrics.queue_depth >= 1);
  } finally {
    await api.close();
  }
});
