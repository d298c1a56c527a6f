// A database blip longer than the outcome write's first pauses while a sent
// outcome waits to be recorded: the dispatcher keeps trying while half a lease
// is left, so the message is recorded once and never sent again.
import assert from "node:assert/strict";
import postgres from "postgres";
import { dispatch } from "../../shared/whatsapp_dispatch.ts";
import { closeDb } from "../../shared/db.ts";
import { resetEnv } from "../../shared/env.ts";
import { dbTest, freshDatabase } from "../support/harness.ts";
import { configureWhatsApp, startFakeWhatsApp } from "../support/fake_whatsapp.ts";

const db = await freshDatabase();
const fake = await startFakeWhatsApp();
await configureWhatsApp({
  WHATSAPP_APP_SECRET: "outage-test-secret-0123456789",
  WHATSAPP_ACCESS_TOKEN: fake.token,
  WHATSAPP_PHONE_NUMBER_ID: fake.phoneNumberId,
  WHATSAPP_API_BASE_URL: fake.url,
  WHATSAPP_RATE_LIMIT_PER_SECOND: 1000,
  WHATSAPP_PAIR_INTERVAL_MS: 0,
  WHATSAPP_SEND_TIMEOUT_MS: 2000,
  WHATSAPP_RETRY_BASE_MS: 10,
  WHATSAPP_LEASE_SECONDS: 20,
  WHATSAPP_LOOKAHEAD_MS: 50,
  WHATSAPP_DISPATCH_BUDGET_MS: 1000,
});

dbTest("a 3 s database blip while a sent outcome is recorded does not send it twice", async () => {
  // writes time out while the row is held, as in an outage
  Deno.env.set("DB_STATEMENT_TIMEOUT_MS", "200");
  resetEnv();
  await closeDb();
  const locker = postgres(db.url, { max: 1, onnotice: () => {} });
  try {
    const to = "250788777001";
    await db.sql`select public.update_whatsapp_session_activity(p_phone_number := ${"+" + to},
                   p_inbound_at := now())`;
    const [{ id }] = await db.sql`select public.enqueue_whatsapp_message(${"+" + to}, 'text',
                                    '{"text": "pay 5000 RWF"}'::jsonb) as id`;
    let held: Promise<unknown> | undefined;
    fake.onRequest = async () => {
      if (held) return;
      let locked!: () => void;
      const isLocked = new Promise<void>((r) => (locked = r));
      held = locker.begin(async (tx) => {
        await tx`select 1 from public.whatsapp_message_queue where id = ${id} for update`;
        locked();
        await new Promise((r) => setTimeout(r, 3000));
      });
      await isLocked;
    };
    await dispatch({ budgetMs: 300 });
    await held;
    fake.onRequest = undefined;
    const [row] = await db.sql`select status, attempts from public.whatsapp_message_queue
                               where id = ${id}`;
    assert.deepEqual({ ...row }, { status: "sent", attempts: 1 }, "recorded once the blip ended");
    // were it still in flight, its lease ending would have it sent again
    await db.sql`update public.whatsapp_message_queue set visible_at = now() - interval '1 s'
                 where id = ${id} and status = 'processing'`;
    await dispatch({ budgetMs: 300 });
    assert.equal(fake.accepted().filter((r) => r.to === to).length, 1, "sent once");
  } finally {
    fake.onRequest = undefined;
    await locker.end();
    Deno.env.delete("DB_STATEMENT_TIMEOUT_MS");
    resetEnv();
    await closeDb();
    await fake.close();
  }
});
