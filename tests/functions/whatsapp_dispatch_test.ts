import assert from "node:assert/strict";
import { app as webhookApp } from "../../supabase/functions/whatsapp-webhook/index.ts";
import { classify, dispatch } from "../../shared/whatsapp_dispatch.ts";
import { dbText } from "../../shared/db.ts";
import { signWebhook, whatsappConfig } from "../../shared/whatsapp.ts";
import { ConfigError } from "../../shared/env.ts";
import { call, dbTest, freshDatabase, serviceToken, TEST_JWT_SECRET } from "../support/harness.ts";
import {
  CLOUD_API_ERRORS,
  configureWhatsApp,
  type FakeRequest,
  startFakeWhatsApp,
} from "../support/fake_whatsapp.ts";
import { inbound, textMessage } from "../support/whatsapp_payloads.ts";

const db = await freshDatabase();
const fake = await startFakeWhatsApp();
const SECRET = "dispatch-test-secret-0123456789";
const BASE = {
  WHATSAPP_APP_SECRET: SECRET,
  WHATSAPP_ACCESS_TOKEN: fake.token,
  WHATSAPP_PHONE_NUMBER_ID: fake.phoneNumberId,
  WHATSAPP_API_BASE_URL: fake.url,
  WHATSAPP_RATE_LIMIT_PER_SECOND: 1000,
  WHATSAPP_PAIR_INTERVAL_MS: 0,
  WHATSAPP_SEND_TIMEOUT_MS: 300,
  WHATSAPP_RETRY_BASE_MS: 10,
  WHATSAPP_LEASE_SECONDS: 5,
  WHATSAPP_LOOKAHEAD_MS: 50,
  WHATSAPP_DISPATCH_BUDGET_MS: 4000,
  WHATSAPP_BACKGROUND_BUDGET_MS: 2000,
  WHATSAPP_TOKEN_PAUSE_SECONDS: 60,
};
await configureWhatsApp(BASE);

let counter = 0;
function phone(): string {
  counter++;
  return "25079" + String(Date.now() % 1e4).padStart(4, "0") + String(counter).padStart(3, "0");
}

async function openWindow(digits: string) {
  await db.sql`select public.update_whatsapp_session_activity(p_phone_number := ${"+" + digits},
                 p_inbound_at := now())`;
}

async function enqueue(
  digits: string,
  type: string,
  payload: unknown,
  opts: { priority?: number; maxAttempts?: number; correlationId?: string } = {},
): Promise<string> {
  const [row] = await db.sql`select public.enqueue_whatsapp_message(
    p_recipient_phone := ${"+" + digits}, p_message_type := ${type},
    p_message_payload := ${db.sql.json(payload as never)}, p_priority := ${opts.priority ?? 5},
    p_max_attempts := ${opts.maxAttempts ?? 5}, p_correlation_id := ${
    opts.correlationId ?? null
  }) as id`;
  return row.id;
}

/** One text each to `n` new recipients with an open window: the recipients and the message ids. */
async function textsToNewRecipients(n: number, text: string) {
  const recipients = Array.from({ length: n }, () => phone());
  const ids: string[] = [];
  for (const to of recipients) {
    await openWindow(to);
    ids.push(await enqueue(to, "text", { text }));
  }
  return { recipients, ids };
}

const row = async (id: string) =>
  (await db.sql`select * from public.whatsapp_message_queue where id = ${id}`)[0];
const sentTo = (digits: string): FakeRequest[] => fake.requests.filter((r) => r.to === digits);

async function metrics(name: string, messageId: string) {
  return await db.sql`select * from public.system_metrics
                      where metric_name = ${name} and tags ->> 'message_id' = ${messageId}`;
}

dbTest("a text goes out in the Cloud API's format and is marked sent", async () => {
  fake.reset();
  const to = phone();
  await openWindow(to);
  const id = await enqueue(to, "text", { text: "Hello!" }, { correlationId: "corr-text-1" });
  const report = await dispatch();
  assert.ok(report.sent >= 1);
  const [req] = sentTo(to);
  assert.deepEqual(req.body, {
    messaging_product: "whatsapp",
    recipient_type: "individual",
    to,
    type: "text",
    text: { body: "Hello!", preview_url: false },
    biz_opaque_callback_data: "corr-text-1",
  });
  const r = await row(id);
  assert.equal(r.status, "sent");
  assert.equal(r.wamid, req.outcome);
  assert.equal(r.attempts, 1);
  assert.equal(r.locked_by, null);
  const [m] = await metrics("whatsapp.message.sent", id);
  assert.equal(m.correlation_id, "corr-text-1");
  const [s] = await db
    .sql`select message_count from public.whatsapp_sessions where phone_number = ${"+" + to}`;
  assert.equal(Number(s.message_count), 1);
});

dbTest("a text's preview_url goes to the Cloud API as enqueued", async () => {
  fake.reset();
  const to = phone();
  await openWindow(to);
  await enqueue(to, "text", { text: { body: "https://easymo.rw/t/7", preview_url: true } });
  await dispatch();
  const [req] = sentTo(to);
  assert.deepEqual(req.body.text, { body: "https://easymo.rw/t/7", preview_url: true });
});

dbTest("every message type is sent in its Cloud API shape", async () => {
  fake.reset();
  const cases: [string, unknown, string, unknown][] = [
    ["template", { name: "ride_confirmed", language: "en_US" }, "template", {
      name: "ride_confirmed",
      language: { code: "en_US" },
    }],
    [
      "media",
      { media_type: "image", link: "https://example.com/r.jpg", caption: "receipt" },
      "image",
      {
        link: "https://example.com/r.jpg",
        caption: "receipt",
      },
    ],
    [
      "media",
      { media_type: "document", id: "1479537139650973", filename: "trip.pdf" },
      "document",
      {
        id: "1479537139650973",
        filename: "trip.pdf",
      },
    ],
    [
      "interactive",
      {
        type: "button",
        body: { text: "Confirm your ride?" },
        action: { buttons: [{ type: "reply", reply: { id: "yes", title: "Yes" } }] },
      },
      "interactive",
      undefined,
    ],
    ["location", { latitude: -1.9536, longitude: 30.0606, name: "KCC" }, "location", {
      latitude: -1.9536,
      longitude: 30.0606,
      name: "KCC",
    }],
  ];
  const recipients = cases.map(() => phone());
  for (const [i, [type, payload]] of cases.entries()) {
    await openWindow(recipients[i]);
    await enqueue(recipients[i], type, payload);
  }
  await dispatch();
  for (const [i, [, payload, wireType, wire]] of cases.entries()) {
    const [req] = sentTo(recipients[i]);
    assert.equal(req.type, wireType);
    assert.deepEqual(req.body[wireType], wire ?? payload);
    assert.match(req.outcome, /^wamid\./);
  }
});

dbTest(
  "free-form messages outside the 24-hour window fail without a send; templates go",
  async () => {
    fake.reset();
    const to = phone();
    const text = await enqueue(to, "text", { text: "are you there?" });
    const template = await enqueue(to, "template", { name: "ride_reminder", language: "en" });
    await dispatch();
    const t = await row(text);
    assert.equal(t.status, "failed");
    assert.equal(t.error_code, "outside_customer_service_window");
    assert.equal((await row(template)).status, "sent");
    assert.deepEqual(sentTo(to).map((r) => r.type), ["template"]);
    assert.equal((await metrics("whatsapp.message.failed", text)).length, 1);
  },
);

dbTest("5xx, dropped connections and timeouts are retried with backoff", async () => {
  fake.reset();
  const plan: [string, (to: string) => void][] = [
    ["131000", (to) => fake.failNext(131000, { to })],
    ["2", (to) => fake.failNext(2, { to })],
    ["network_error", (to) => fake.dropNext({ to })],
    ["timeout", (to) => fake.slowNext(1000, { to })],
  ];
  const ids: string[] = [];
  for (const [, arrange] of plan) {
    const to = phone();
    await openWindow(to);
    arrange(to);
    ids.push(await enqueue(to, "text", { text: "retry me" }));
  }
  await dispatch();
  for (const [i, [code]] of plan.entries()) {
    const r = await row(ids[i]);
    assert.equal(r.status, "sent", `${code}: ${r.status} ${r.error_code}`);
    assert.equal(r.attempts, 2, code);
    const [m] = await metrics("whatsapp.message.retry", ids[i]);
    assert.equal(m?.tags.error_code, code);
  }
});

// A spell of throttling must not dead-letter a backlog: the messages go back
// without spending an attempt and the number pauses for a while.
dbTest("throttling puts the messages back unspent and pauses the number", async () => {
  for (const code of [130429, 131056, 131048]) {
    fake.reset();
    await db.sql`update private.whatsapp_send_windows set paused_until = null`;
    const { ids } = await textsToNewRecipients(3, `throttled ${code}`);
    await db.sql`update public.whatsapp_message_queue set max_attempts = 1
                 where id = any(${ids}::bigint[])`;
    fake.failNext(code, { times: 100 });
    const report = await dispatch();
    assert.equal(report.paused, "throttled", JSON.stringify(report));
    assert.equal(report.dead_lettered, 0, JSON.stringify(report));
    assert.ok(report.throttled >= 1, JSON.stringify(report));
    for (const id of ids) {
      const r = await row(id);
      assert.deepEqual([r.status, r.attempts], ["pending", 0], `${code}: no attempt is spent`);
    }
    const [w] = await db.sql`select extract(epoch from paused_until - now()) as s, pause_reason
                             from private.whatsapp_send_windows`;
    assert.ok(w.s > 20 && w.s <= 30, `paused for WHATSAPP_THROTTLE_PAUSE_SECONDS: ${w.s}`);
    assert.equal(w.pause_reason, `throttled:${code}`);
    for (const id of ids) {
      assert.equal((await metrics("whatsapp.message.throttled", id)).length, 1, "one metric each");
    }
  }
  await db.sql`update private.whatsapp_send_windows set paused_until = null`;
  await db.sql`update public.whatsapp_message_queue set status = 'cancelled', cancelled_at = now()
               where status = 'pending' and error_code in ('130429', '131056', '131048')`;
  fake.reset();
});

dbTest("permanent errors fail at once and keep the code", async () => {
  fake.reset();
  for (const code of [131026, 131047, 100]) {
    const to = phone();
    await openWindow(to);
    fake.failNext(code, { to });
    const id = await enqueue(to, "text", { text: "permanent" });
    await dispatch();
    const r = await row(id);
    assert.equal(r.status, "failed");
    assert.equal(r.error_code, String(code));
    assert.equal(r.attempts, 1);
    assert.equal(sentTo(to).length, 1);
    const [s] = await db.sql`select * from public.whatsapp_sessions where phone_number = ${
      "+" + to
    }`;
    assert.equal(Number(s.error_count), 1);
    assert.match(s.last_error, new RegExp(`^${code}: `));
  }
});

// Meta took the message but its answer was lost before the message id, or
// the id is one the queue cannot store (so the send could not be recorded and
// would go out again after every lease): a retry would deliver it twice.
dbTest("a send Meta accepted without a readable message id is not sent again", async () => {
  fake.reset();
  const answers: ((to: string) => void)[] = [
    (to) => fake.cutNext({ to }),
    ...["wamid.\u0000nul", "wamid.\ud800", "wamid." + "x".repeat(300), "wamid. "].map(
      (id) => (to: string) => fake.idNext(id, { to }),
    ),
  ];
  for (const answer of answers) {
    const to = phone();
    await openWindow(to);
    answer(to);
    const id = await enqueue(to, "text", { text: "once" });
    await dispatch();
    const r = await row(id);
    assert.deepEqual([r.status, r.error_code, r.attempts], ["failed", "unconfirmed_send", 1]);
    await dispatch();
    assert.equal(sentTo(to).length, 1, "Meta got it once");
  }
});

dbTest("a message out of attempts becomes a dead letter", async () => {
  fake.reset();
  const to = phone();
  await openWindow(to);
  fake.failNext(131000, { to, times: 5 });
  const id = await enqueue(to, "text", { text: "doomed" }, { maxAttempts: 3 });
  await dispatch();
  const r = await row(id);
  assert.equal(r.status, "failed");
  assert.equal(r.attempts, 3);
  assert.equal(r.error_code, "131000");
  assert.ok(r.dead_lettered_at);
  assert.equal(sentTo(to).length, 3);
  assert.equal((await metrics("whatsapp.message.dead_letter", id)).length, 1);
});

dbTest("an expired token stops sending, keeps the messages and raises an alert", async () => {
  fake.reset();
  const { ids } = await textsToNewRecipients(3, "token");
  fake.failNext(190, { times: 100 });
  const first = await dispatch();
  assert.match(first.paused ?? "", /token_invalid/);
  for (const id of ids) {
    const r = await row(id);
    assert.equal(r.status, "pending");
    assert.equal(r.attempts, 0, "no attempt is burnt");
  }
  const alerts = await db
    .sql`select * from public.system_metrics where metric_name = 'whatsapp.alert.token_invalid'`;
  assert.ok(alerts.length >= 1);
  assert.equal(alerts[0].metric_type, "alert");

  const seen = fake.requests.length;
  const second = await dispatch();
  assert.match(second.paused ?? "", /token_invalid/);
  assert.equal(fake.requests.length, seen, "nothing is sent while paused");

  // a new token: lift the pause and everything goes out
  fake.reset();
  await db.sql`update private.whatsapp_send_windows set paused_until = null`;
  await db
    .sql`update public.whatsapp_message_queue set visible_at = now() where id = any(${ids}::bigint[])`;
  await dispatch();
  for (const id of ids) assert.equal((await row(id)).status, "sent");
});

// An account that cannot send (locked, payment, permissions) would fail every
// message alike: they are kept, and the number pauses with an alert.
dbTest("a refused business account keeps the messages, pauses and raises an alert", async () => {
  fake.reset();
  await db.sql`update private.whatsapp_send_windows set paused_until = null`;
  const { ids } = await textsToNewRecipients(3, "account");
  fake.failNext(131031, { times: 100 });
  const report = await dispatch();
  assert.equal(report.paused, "account_refused", JSON.stringify(report));
  assert.equal(report.failed, 0, JSON.stringify(report));
  for (const id of ids) {
    const r = await row(id);
    assert.deepEqual([r.status, r.attempts], ["pending", 0], "kept, no attempt spent");
  }
  const [w] = await db.sql`select pause_reason from private.whatsapp_send_windows`;
  assert.equal(w.pause_reason, "account_refused:131031");
  const alerts = await db.sql`select metric_type from public.system_metrics
                              where metric_name = 'whatsapp.alert.account_refused'`;
  assert.ok(alerts.length >= 1 && alerts[0].metric_type === "alert");
  await db.sql`update private.whatsapp_send_windows set paused_until = null`;
  await db.sql`update public.whatsapp_message_queue set status = 'cancelled', cancelled_at = now()
               where id = any(${ids}::bigint[])`;
  fake.reset();
});

// Graph's code 3 (a capability or permission the app lacks, sent with HTTP
// 500) and 200-299 (API permissions, HTTP 403) refuse every message alike:
// retried, they would spend every attempt; failed, all would be lost.
dbTest("permission errors (3, 200-299) pause the number like a refused account", async () => {
  for (const code of [3, 200, 230, 299]) {
    fake.reset();
    await db.sql`update private.whatsapp_send_windows set paused_until = null`;
    const { ids } = await textsToNewRecipients(2, `permission ${code}`);
    fake.failNext(code, { times: 100 });
    const report = await dispatch();
    assert.equal(report.paused, "account_refused", `${code}: ${JSON.stringify(report)}`);
    assert.deepEqual([report.failed, report.retried], [0, 0], `${code}: ${JSON.stringify(report)}`);
    for (const id of ids) {
      const r = await row(id);
      assert.deepEqual([r.status, r.attempts], ["pending", 0], `${code}: kept, no attempt spent`);
    }
    const [w] = await db.sql`select pause_reason from private.whatsapp_send_windows`;
    assert.equal(w.pause_reason, `account_refused:${code}`);
    await db.sql`update public.whatsapp_message_queue set status = 'cancelled', cancelled_at = now()
                 where id = any(${ids}::bigint[])`;
  }
  await db.sql`update private.whatsapp_send_windows set paused_until = null`;
  fake.reset();
});

dbTest("a rate limit slower than the lookahead still sends", async () => {
  fake.reset();
  // 2 a second is one slot per 500 ms, ten times the 50 ms lookahead
  await configureWhatsApp({ ...BASE, WHATSAPP_RATE_LIMIT_PER_SECOND: 2 });
  try {
    await textsToNewRecipients(3, "slow and steady");
    const report = await dispatch();
    assert.equal(report.sent, 3, JSON.stringify(report));
    const times = fake.accepted().map((r) => r.at).sort((a, b) => a - b);
    for (let i = 1; i < times.length; i++) {
      assert.ok(times[i] - times[i - 1] >= 440, `2 a second: ${times[i] - times[i - 1]} ms`);
    }
  } finally {
    await configureWhatsApp(BASE);
  }
});

dbTest("slots after a refused token are not spent on it", async () => {
  fake.reset();
  // One claim hands out all four slots, 100 ms apart: the refusal of the first
  // arrives long before the second.
  await configureWhatsApp({
    ...BASE,
    WHATSAPP_RATE_LIMIT_PER_SECOND: 10,
    WHATSAPP_LOOKAHEAD_MS: 1000,
  });
  const { ids } = await textsToNewRecipients(4, "after the refusal");
  try {
    fake.failNext(190);
    const report = await dispatch();
    assert.equal(report.claimed, 4, JSON.stringify(report));
    assert.match(report.paused ?? "", /token_invalid/, JSON.stringify(report));
    assert.equal(fake.requests.length, 1, "only the first slot reached the Cloud API");
    for (const id of ids) {
      const r = await row(id);
      assert.equal(r.status, "pending");
      assert.equal(r.attempts, 0, "no attempt is burnt");
      assert.equal(r.error_code, "190", "every message keeps the refusal's code");
    }
    const [w] = await db.sql`select pause_reason from private.whatsapp_send_windows`;
    assert.equal(w.pause_reason, "token_invalid:190");
  } finally {
    // lift the pause and drop this test's messages, for the tests that follow
    await db.sql`update private.whatsapp_send_windows set paused_until = null`;
    await db.sql`update public.whatsapp_message_queue
                 set status = 'cancelled', cancelled_at = now(), lease_token = null, locked_by = null
                 where id = any(${ids}::bigint[])`;
    await configureWhatsApp(BASE);
  }
});

dbTest("higher priority goes first; within a priority, enqueue order", async () => {
  fake.reset();
  const to = phone();
  await openWindow(to);
  await enqueue(to, "text", { text: "low-1" }, { priority: 1 });
  await enqueue(to, "text", { text: "normal-1" });
  await enqueue(to, "text", { text: "urgent" }, { priority: 10 });
  await enqueue(to, "text", { text: "normal-2" });
  await enqueue(to, "text", { text: "low-2" }, { priority: 1 });
  await dispatch();
  assert.deepEqual(
    sentTo(to).map((r) => (r.body.text as { body: string }).body),
    ["urgent", "normal-1", "normal-2", "low-1", "low-2"],
  );
});

dbTest(
  "3 concurrent dispatchers hold the rate limit, pair pacing and per-recipient order",
  async () => {
    fake.reset();
    // 24 recipients paced 600 ms apart want 40 sends a second: both limits bind.
    const RATE = 40;
    const PAIR_MS = 600;
    const RECIPIENTS = 24;
    await configureWhatsApp({
      ...BASE,
      WHATSAPP_RATE_LIMIT_PER_SECOND: RATE,
      WHATSAPP_PAIR_INTERVAL_MS: PAIR_MS,
      // 192 messages at 40 a second take about five
      WHATSAPP_DISPATCH_BUDGET_MS: 8000,
    });
    try {
      const recipients = Array.from({ length: RECIPIENTS }, () => phone());
      for (const to of recipients) await openWindow(to);
      for (let k = 0; k < 8; k++) {
        for (const to of recipients) await enqueue(to, "text", { text: `${to}#${k}` });
      }
      const reports = await Promise.all([1, 2, 3].map((n) => dispatch({ dispatcherId: `d${n}` })));
      assert.equal(reports.reduce((n, r) => n + r.sent, 0), RECIPIENTS * 8);
      assert.ok(reports.filter((r) => r.sent > 0).length >= 2, "the work is shared");

      const accepted = fake.accepted().filter((r) => recipients.includes(r.to));
      assert.equal(accepted.length, RECIPIENTS * 8, "each message is sent exactly once");
      for (const to of recipients) {
        const mine = accepted.filter((r) => r.to === to);
        assert.deepEqual(
          mine.map((r) => (r.body.text as { body: string }).body),
          Array.from({ length: 8 }, (_, k) => `${to}#${k}`),
          "enqueue order per recipient",
        );
        for (let i = 1; i < mine.length; i++) {
          // Slots are PAIR_MS apart; arrival at the fake adds timer and event-loop
          // jitter (tens of ms on a busy 2-core machine), so allow 60 ms (10%).
          // Without pacing the gap would be one global slot (1000 / RATE = 25 ms).
          assert.ok(
            mine[i].at - mine[i - 1].at >= PAIR_MS - 60,
            `pair pacing: ${mine[i].at - mine[i - 1].at} ms`,
          );
        }
      }
      const times = accepted.map((r) => r.at).sort((a, b) => a - b);
      let worst = 0;
      for (let i = 0, j = 0; i < times.length; i++) {
        while (times[i] - times[j] >= 1000) j++;
        worst = Math.max(worst, i - j + 1);
      }
      // Slots are 1/RATE apart; timer jitter can pull a send from each edge of a
      // window into it, so two extra is all we allow (unlimited, all of them
      // would go out within a second).
      assert.ok(worst <= RATE + 2, `at most ${RATE} per second, saw ${worst}`);
      const span = (times[times.length - 1] - times[0]) / 1000;
      assert.ok((times.length - 1) / span <= RATE * 1.02, `average ${(times.length - 1) / span}/s`);
    } finally {
      await configureWhatsApp(BASE);
    }
  },
);

dbTest("a dispatcher killed mid-batch loses no message", async () => {
  fake.reset();
  fake.latencyMs = 3000;
  const { recipients, ids } = await textsToNewRecipients(10, "survive");
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      new URL("../support/run_dispatcher.ts", import.meta.url).pathname,
      "doomed",
    ],
    env: {
      ...Object.fromEntries(Object.entries(BASE).map(([k, v]) => [k, String(v)])),
      SUPABASE_DB_URL: db.url,
      JWT_SECRET: TEST_JWT_SECRET,
      LOG_LEVEL: "silent",
      WHATSAPP_LEASE_SECONDS: "2",
      WHATSAPP_SEND_TIMEOUT_MS: "1000",
    },
    stdout: "null",
    stderr: "null",
  }).spawn();
  const deadline = Date.now() + 20_000;
  while (
    fake.requests.filter((r) => recipients.includes(r.to)).length < 10 && Date.now() < deadline
  ) {
    await new Promise((r) => setTimeout(r, 25));
  }
  const held = await db.sql`select count(*)::int as n from public.whatsapp_message_queue
                            where id = any(${ids}::bigint[]) and status = 'processing' and locked_by = 'doomed'`;
  assert.equal(held[0].n, 10, "the doomed dispatcher holds the whole batch");
  child.kill("SIGKILL");
  await child.status;

  fake.latencyMs = 0;
  await new Promise((r) => setTimeout(r, 2200)); // its leases run out
  const report = await dispatch({ dispatcherId: "survivor" });
  assert.ok(report.sent >= 10);
  for (const id of ids) {
    const r = await row(id);
    assert.equal(r.status, "sent");
    assert.equal(r.attempts, 2);
    assert.equal((await metrics("whatsapp.message.retry", id))[0].tags.error_code, "lease_expired");
  }
});

dbTest("POST /whatsapp-webhook/dispatch drains the queue for the service role", async () => {
  fake.reset();
  const to = phone();
  await openWindow(to);
  const id = await enqueue(to, "text", { text: "cron" });
  const res = await call(webhookApp, "POST", "/whatsapp-webhook/dispatch", {
    token: await serviceToken(),
    body: { budget_ms: 2000 },
  });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.ok(res.body.sent >= 1);
  assert.equal((await row(id)).status, "sent");
});

dbTest("an inbound webhook wakes the dispatcher after answering", async () => {
  fake.reset();
  const to = phone();
  const id = await enqueue(to, "template", { name: "welcome", language: "en" });
  const body = JSON.stringify(inbound(to, textMessage("hi")));
  const res = await call(webhookApp, "POST", "/whatsapp-webhook", {
    body,
    headers: { "x-hub-signature-256": signWebhook(body, SECRET) },
  });
  assert.equal(res.status, 200);
  const deadline = Date.now() + 5000;
  while ((await row(id)).status !== "sent" && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.equal((await row(id)).status, "sent");
});

dbTest(
  "a failing claim still lets sends in flight finish and records them before returning",
  async () => {
    fake.reset();
    fake.latencyMs = 200; // under WHATSAPP_SEND_TIMEOUT_MS
    const { recipients: to, ids } = await textsToNewRecipients(3, "in flight");
    // The first claim hands out all three. As the first of them reaches the
    // Cloud API, claims start failing, and no send is answered before that:
    // with sends in flight the dispatcher claims again, and that claim fails.
    let revoked: Promise<void> | undefined;
    fake.onRequest = (r) => {
      if (!to.includes(r.to)) return;
      revoked ??= db.sql`revoke execute on function public.claim_whatsapp_messages(
                         text, text, integer, integer, integer, integer, integer) from service_role`
        .then(() => {});
      return revoked;
    };
    try {
      await assert.rejects(dispatch(), (err: { status?: number }) => err.status === 403);
      assert.ok(revoked, "the sends reached the Cloud API");
      await revoked;
      // dispatch() has settled: every send that went out is recorded already.
      for (const id of ids) assert.equal((await row(id)).status, "sent", `message ${id}`);
      assert.equal(fake.requests.filter((r) => to.includes(r.to)).length, 3);
    } finally {
      fake.onRequest = undefined;
      fake.latencyMs = 0;
      // A revoke still on its way must not land after the grant.
      await revoked?.catch(() => {});
      await db.sql`grant execute on function public.claim_whatsapp_messages(
                   text, text, integer, integer, integer, integer, integer) to service_role`;
    }
  },
);

/** Makes recording a send to `digits` fail: always, or only the first time. */
async function failRecordingSendsTo(digits: string, status: 400 | 503, once: boolean) {
  await db.sql.unsafe(`
    create sequence private.test_outcome_writes;
    create function private.test_outcome_write() returns trigger
    language plpgsql security definer set search_path = '' as $$
    begin
      if nextval('private.test_outcome_writes') = 1 or not ${once} then
        perform private.raise_error(${status}, 'test_failure', 'recording this send fails (test)');
      end if;
      return new;
    end $$;
    create trigger test_outcome_write before update on public.whatsapp_message_queue
      for each row when (old.wamid is null and new.wamid is not null
                         and new.recipient_phone = '+${digits}')
      execute function private.test_outcome_write();`);
}

async function recordingWorksAgain() {
  await db.sql.unsafe(`
    drop trigger if exists test_outcome_write on public.whatsapp_message_queue;
    drop function if exists private.test_outcome_write();
    drop sequence if exists private.test_outcome_writes;`);
}

dbTest(
  "error text with NUL, a lone surrogate or an emoji at the cut is recorded with its batch",
  async () => {
    fake.reset();
    const { recipients, ids: [oddId, longId, ...mateIds] } = await textsToNewRecipients(4, "batch");
    const [odd, long, ...mates] = recipients;
    fake.failNext(131026, { to: odd, message: "bad\u0000byte, half an emoji \ud83d!" });
    // Cut at 2,000 UTF-16 code units, this text would end in half an emoji. (A
    // retry: a failure's text also goes to whatsapp_sessions.last_error behind
    // its code, where 2,000 characters do not fit.)
    fake.failNext(131000, { to: long, message: "a".repeat(1999) + "\u{1F600} and more" });
    const report = await dispatch();
    assert.ok(
      report.failed >= 1 && report.retried >= 1 && report.sent >= 3,
      JSON.stringify(report),
    );

    const r = await row(oddId);
    assert.equal(r.status, "failed", `${r.status} ${r.error_code}`);
    assert.equal(r.error_code, "131026");
    assert.equal(
      r.last_error,
      `badbyte, half an emoji \ufffd!: ${CLOUD_API_ERRORS[131026].details}`,
    );
    const l = await row(longId);
    assert.equal(l.status, "sent", `${l.status} ${l.error_code}`);
    assert.equal(l.attempts, 2, "the retry was recorded, not lost with an expired lease");
    assert.equal((await metrics("whatsapp.message.retry", longId))[0]?.tags.error_code, "131000");
    assert.equal(sentTo(long).length, 2);
    for (const id of mateIds) {
      const m = await row(id);
      assert.equal(m.status, "sent", `message ${id}: ${m.status}`);
      assert.equal(m.attempts, 1);
    }
    for (const digits of [odd, ...mates]) assert.equal(sentTo(digits).length, 1);
  },
);

dbTest(
  "a failure with a long message is recorded, its session's last error cut to 2,000",
  async () => {
    fake.reset();
    const digits = phone();
    await openWindow(digits);
    fake.failNext(131026, { to: digits, message: "x".repeat(1990) });
    const id = await enqueue(digits, "text", { text: "long failure" });
    await dispatch();
    const r = await row(id);
    assert.equal(r.status, "failed", `${r.status} ${r.error_code}`);
    const [session] = await db.sql`select char_length(last_error) as n, error_count
                                 from public.whatsapp_sessions
                                 where phone_number = ${r.recipient_phone}`;
    assert.equal(session.n, 2000);
    assert.equal(Number(session.error_count), 1, JSON.stringify(session));
  },
);

dbTest("a failed outcome write is tried again, so nothing is sent twice", async () => {
  fake.reset();
  const { recipients, ids } = await textsToNewRecipients(2, "outage");
  const [flaky] = recipients;
  // The first write recording flaky's send fails like a brief outage (503).
  await failRecordingSendsTo(flaky, 503, true);
  try {
    const report = await dispatch();
    assert.ok(report.sent >= 2, JSON.stringify(report));
    for (const id of ids) {
      const r = await row(id);
      assert.equal(r.status, "sent", `message ${id}: ${r.status}`);
      assert.equal(r.attempts, 1);
    }
    for (const digits of recipients) assert.equal(sentTo(digits).length, 1);
    const [seq] = await db.sql`select last_value::int as n from private.test_outcome_writes`;
    assert.equal(seq.n, 2, "one write failed, the next one recorded the send");
  } finally {
    await recordingWorksAgain();
  }
});

dbTest(
  "an outcome the database rejects is dropped alone; its batch-mates are recorded",
  async () => {
    fake.reset();
    const { recipients, ids: [badId, ...mateIds] } = await textsToNewRecipients(4, "split");
    const [bad] = recipients;
    await failRecordingSendsTo(bad, 400, false);
    try {
      // shorter than the lease: the dropped message is not claimed again
      const report = await dispatch({ budgetMs: 1500 });
      assert.ok(report.sent >= 3, JSON.stringify(report));
      for (const id of mateIds) assert.equal((await row(id)).status, "sent", `message ${id}`);
      const r = await row(badId);
      assert.equal(r.status, "processing", "its lease will expire and it will go again");
      assert.equal(r.wamid, null);
      for (const digits of recipients) assert.equal(sentTo(digits).length, 1);
    } finally {
      await recordingWorksAgain();
      await db.sql`update public.whatsapp_message_queue
                 set status = 'cancelled', cancelled_at = now(), lease_token = null, locked_by = null
                 where id = ${badId}`;
    }
  },
);

dbTest("cleanup: stop the fake", async () => {
  await fake.close();
});

Deno.test("Cloud API answers are classified as the queue needs them", () => {
  const cases: [number, number | undefined, string][] = [
    [400, 130429, "throttle"],
    [400, 131056, "throttle"],
    [400, 131048, "throttle"],
    [429, undefined, "throttle"],
    [500, 131000, "retry"],
    [503, undefined, "retry"],
    [502, 2, "retry"],
    // Meta's server temporarily unavailable: the code decides, whatever the status
    [503, 133004, "retry"],
    [400, 133004, "retry"],
    // the account in maintenance mode (a throughput upgrade; Meta answers 500):
    // every send would fail alike, so the number pauses and no attempt is spent
    [500, 131057, "throttle"],
    [400, 131057, "throttle"],
    [400, 131026, "failed"],
    [400, 131047, "failed"],
    [400, 100, "failed"],
    [400, 131009, "failed"],
    [401, 190, "stop"],
    [400, 131031, "refused"],
    [403, 10, "refused"],
    [400, 133010, "refused"],
    // Graph's permission family: 3 comes with HTTP 500, 200-299 with 403
    [500, 3, "refused"],
    [403, 200, "refused"],
    [403, 230, "refused"],
    [403, 299, "refused"],
    [400, 300, "failed"],
    [401, undefined, "stop"],
    [400, 0, "stop"],
    // the HTTP status decides when the Graph code is one not listed
    [429, 17, "throttle"],
    [429, 613, "throttle"],
    [401, 102, "stop"],
  ];
  for (const [status, code, outcome] of cases) {
    assert.equal(classify(status, code), outcome, `${status}/${code}`);
  }
});

Deno.test("dbText is what the database takes: no NUL, well-formed, cut by code point", () => {
  assert.equal(dbText("a\u0000b", 10), "ab");
  assert.equal(dbText("x\ud83dy\ude00", 10), "x\ufffdy\ufffd");
  assert.equal(dbText("ab\u{1F600}cd", 3), "ab\u{1F600}");
  assert.equal(dbText("\u0000".repeat(5) + "abc", 2), "ab");
});

Deno.test("WhatsApp configuration is validated on its own", async () => {
  for (
    const [key, value] of [
      ["WHATSAPP_API_BASE_URL", "http://graph.example.com"],
      ["WHATSAPP_RATE_LIMIT_PER_SECOND", "1001"],
      ["WHATSAPP_API_VERSION", "21"],
    ]
  ) {
    await configureWhatsApp({ ...BASE, [key]: value });
    assert.throws(
      () => whatsappConfig(),
      (e: Error) => e instanceof ConfigError && e.message.includes(key),
    );
  }
  // a lease that could end while its send still waits on Meta
  await configureWhatsApp({
    ...BASE,
    WHATSAPP_LEASE_SECONDS: 60,
    WHATSAPP_SEND_TIMEOUT_MS: 40_000,
  });
  assert.throws(
    () => whatsappConfig(),
    (e: Error) => e instanceof ConfigError && /WHATSAPP_LEASE_SECONDS.*twice/.test(e.message),
  );
  await configureWhatsApp({ ...BASE, WHATSAPP_API_VERSION: undefined });
  assert.equal(whatsappConfig().WHATSAPP_RATE_LIMIT_PER_SECOND, 1000);
  assert.equal(whatsappConfig().WHATSAPP_API_VERSION, "v21.0");
});

// Meta's status and the dispatcher's record of the send race: whichever
// commits second must see the first, so a failed message never shows as sent.
dbTest(
  "a failed status racing the dispatcher's sent record leaves the message failed",
  async () => {
    const to = phone();
    await openWindow(to);
    const id = await enqueue(to, "text", { text: "hi" });
    const [{ c }] = await db
      .sql`select public.claim_whatsapp_messages('race', 'biz-race', 10, 1000, 0,
                                 60, 250) as c`;
    const m = c.messages.find((x: { id: number }) => String(x.id) === String(id));
    const wamid = `wamid.RACE${crypto.randomUUID()}`;
    let commit!: () => void;
    const committed = new Promise<void>((r) => (commit = r));
    let ingested!: () => void;
    const isIngested = new Promise<void>((r) => (ingested = r));
    const status = db.sql.begin(async (tx) => {
      await tx`select public.ingest_whatsapp_events(p_statuses := ${
        tx.json([{
          wamid,
          status: "failed",
          occurred_at: new Date().toISOString(),
          recipient_phone: "+" + to,
          error_code: "131026",
          error_message: "undeliverable",
        }])
      })`;
      ingested();
      await committed;
    });
    await isIngested;
    const sent = db.sql`select public.complete_whatsapp_messages('race', 'biz-race', ${
      db.sql.json([{
        id: m.id,
        lease_token: m.lease_token,
        outcome: "sent",
        wamid,
        duration_ms: 1,
      }])
    })`.execute();
    await new Promise((r) => setTimeout(r, 100));
    commit();
    await status;
    await sent;
    const r = await row(id);
    assert.deepEqual([r.status, r.wamid, r.error_code], ["failed", wamid, "131026"]);
  },
);
