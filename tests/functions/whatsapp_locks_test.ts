// Lock order between the webhook's ingest and the dispatcher's completion.
// Both take a session row (the ingest for a sender, the completion for a
// recipient) and the advisory lock of a wamid's bucket (a status and the
// record of its send look for each other under it). Taken in opposite
// orders, the two deadlock; db.ts would retry the loser, so these tests call
// the SQL functions on their own connections, where a deadlock shows.
import assert from "node:assert/strict";
import postgres from "postgres";
import { dbTest, freshDatabase } from "../support/harness.ts";
import { wamid } from "../support/whatsapp_payloads.ts";

const db = await freshDatabase();

/** A connection of its own that reports a deadlock after 50 ms instead of 1 s. */
async function connection(): Promise<postgres.Sql> {
  const sql = postgres(db.url, { max: 1, onnotice: () => {}, prepare: false });
  await sql`set deadlock_timeout = '50ms'`;
  return sql;
}

let counter = 0;
function phone(): string {
  counter++;
  return "+25072" + String(Date.now() % 1e4).padStart(4, "0") + String(counter).padStart(3, "0");
}

/** A message to a new recipient (its session made), claimed: its id and lease. */
async function claimedMessage(to: string, business: string) {
  await db.sql`select public.update_whatsapp_session_activity(p_phone_number := ${to},
                 p_inbound_at := now())`;
  const [{ id }] = await db.sql`select public.enqueue_whatsapp_message(${to}, 'text',
                                  '{"text": "your moto is here"}'::jsonb) as id`;
  const [{ c }] = await db.sql`select public.claim_whatsapp_messages('locks', ${business}, 10,
                                  1000, 0, 60, 250) as c`;
  const m = c.messages.find((x: { id: number }) => String(x.id) === String(id));
  assert.ok(m, "claimed");
  return m as { id: number; lease_token: string };
}

/**
 * The webhook's ingest, as the service role: a message from `from`, with a
 * delivered status of the send `delivered` to them, or the given contacts.
 */
function ingest(
  sql: postgres.Sql,
  from: string,
  also: { delivered?: string; contacts?: string[] },
) {
  const statuses = also.delivered
    ? [{
      wamid: also.delivered,
      status: "delivered",
      occurred_at: new Date().toISOString(),
      recipient_phone: from,
    }]
    : [];
  const contacts = (also.contacts ?? []).map((phone) => ({ phone, display_name: "Rider" }));
  return sql.begin(async (tx) => {
    await tx`set local role service_role`;
    await tx`select public.ingest_whatsapp_events(
      p_messages := ${
      tx.json([{
        wamid: wamid(),
        from_phone: from,
        message_type: "text",
        sent_at: new Date().toISOString(),
        text_body: "I am outside",
        payload: { type: "text", text: { body: "I am outside" } },
      }])
    },
      p_statuses := ${tx.json(statuses)},
      p_contacts := ${tx.json(contacts)})`;
  });
}

/** The dispatcher's record that message `m` went out as `w`. */
function complete(
  sql: postgres.Sql,
  business: string,
  m: { id: number; lease_token: string },
  w: string,
) {
  return sql.begin(async (tx) => {
    await tx`set local role service_role`;
    await tx`select public.complete_whatsapp_messages('locks', ${business}, ${
      tx.json([{ id: m.id, lease_token: m.lease_token, outcome: "sent", wamid: w, duration_ms: 1 }])
    })`;
  });
}

const pidOf = async (sql: postgres.Sql) => (await sql`select pg_backend_pid() as pid`)[0].pid;

/** Waits until backend `pid` waits on a lock. */
async function waitsOnLock(pid: number): Promise<void> {
  const until = Date.now() + 10_000;
  while (Date.now() < until) {
    const [row] = await db.sql`select wait_event_type from pg_stat_activity where pid = ${pid}`;
    if (row?.wait_event_type === "Lock") return;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`backend ${pid} never waited on a lock`);
}

/** The errors of settled calls, by SQLSTATE. */
function failures(results: PromiseSettledResult<unknown>[]): string[] {
  return results.flatMap((r) =>
    r.status === "rejected" ? [`${(r.reason as { code?: string }).code}: ${r.reason}`] : []
  );
}

// The interleaving that deadlocked, forced: a third transaction holds the
// session while the ingest and then the completion queue up behind it.
dbTest("an ingest and a completion queued on one session both finish", async () => {
  const [a, b] = [await connection(), await connection()];
  const holder = await db.sql.reserve();
  try {
    const to = phone();
    const m = await claimedMessage(to, "biz-locks-1");
    const w = wamid();
    const [pidA, pidB] = [await pidOf(a), await pidOf(b)];
    await holder`begin`;
    await holder`select 1 from public.whatsapp_sessions where phone_number = ${to} for update`;
    const ingested = ingest(a, to, { delivered: w });
    await waitsOnLock(pidA);
    const completed = complete(b, "biz-locks-1", m, w);
    await waitsOnLock(pidB);
    await holder`commit`;
    const results = await Promise.allSettled([ingested, completed]);
    assert.deepEqual(failures(results), [], "no deadlock");
    // and whichever committed second saw the first: the send adopted the status
    const [row] = await db.sql`select status, wamid from public.whatsapp_message_queue
                               where id = ${m.id}`;
    assert.deepEqual([row.status, row.wamid], ["delivered", w]);
  } finally {
    holder.release();
    await Promise.all([a.end(), b.end()]);
  }
});

// The same two calls raced many times, as the webhook and the dispatcher meet
// in production: no deadlock, by the calls' own errors and by the database's
// count (which the server updates a moment later; it can only miss one).
dbTest(
  "ingests and completions racing on the same sessions and wamids never deadlock",
  async () => {
    const pairs = 5;
    const conns = await Promise.all(Array.from({ length: pairs * 2 }, () => connection()));
    const deadlocks = async () =>
      Number(
        (await db.sql`select deadlocks from pg_stat_database where datname = current_database()`)[0]
          .deadlocks,
      );
    try {
      const before = await deadlocks();
      const seen: string[] = [];
      // Under the old lock order this found a deadlock within a few rounds;
      // 40 rounds of 5 bound the test at a few seconds.
      for (let round = 0; round < 40 && seen.length === 0; round++) {
        const setups = [];
        for (let i = 0; i < pairs; i++) {
          const to = phone();
          const business = `biz-race-${round}-${i}`;
          setups.push({ to, business, m: await claimedMessage(to, business), w: wamid() });
        }
        const work = setups.flatMap(({ to, business, m, w }, i) => [
          ingest(conns[2 * i], to, { delivered: w }),
          complete(conns[2 * i + 1], business, m, w),
        ]);
        seen.push(...failures(await Promise.allSettled(work)));
      }
      assert.deepEqual(seen, [], "no call failed");
      await new Promise((r) => setTimeout(r, 1500));
      await db.sql`select pg_stat_clear_snapshot()`;
      assert.equal(await deadlocks(), before, "the database counted no deadlock");
    } finally {
      await Promise.all(conns.map((c) => c.end()));
    }
  },
);

// --- session rows: every call takes all of its own in one statement --------------
//
// Each statement locks its session rows in phone order, but a call of several
// statements (the ingest: contacts, then senders; the completion: recipients
// of sends, then of each failure group) could take two sessions in opposite
// orders to another call's. The interleavings below force that: a third
// transaction holds the completion's failed message, so it stops between its
// two statements.

type Result = { id: number; lease_token: string; outcome: string; wamid?: string };

/** A dispatcher's record of several outcomes. */
function completeAll(sql: postgres.Sql, business: string, results: Result[]) {
  return sql.begin(async (tx) => {
    await tx`set local role service_role`;
    await tx`select public.complete_whatsapp_messages('locks', ${business}, ${
      tx.json(results.map((r) => ({ error_code: "131026", duration_ms: 1, ...r })))
    })`;
  });
}

/** A wamid whose lock bucket (private.lock_key_buckets) is not that of `other`. */
async function wamidBesides(other: string): Promise<string> {
  for (;;) {
    const w = wamid();
    const [{ same }] = await db
      .sql`select (hashtext(${w}) & 63) = (hashtext(${other}) & 63) as same`;
    if (!same) return w;
  }
}

/**
 * Runs `first`, which stops on the locked message `held`, then `second`,
 * until it waits too; then lets `first` go. Returns both calls' errors.
 */
async function interleaved(
  held: number,
  first: (sql: postgres.Sql) => Promise<unknown>,
  second: (sql: postgres.Sql) => Promise<unknown>,
): Promise<string[]> {
  const [a, b] = [await connection(), await connection()];
  const holder = await db.sql.reserve();
  try {
    const [pidA, pidB] = [await pidOf(a), await pidOf(b)];
    await holder`begin`;
    await holder`select 1 from public.whatsapp_message_queue where id = ${held} for update`;
    const one = first(a);
    await waitsOnLock(pidA);
    const two = second(b);
    await waitsOnLock(pidB);
    await holder`commit`;
    return failures(await Promise.allSettled([one, two]));
  } finally {
    holder.release();
    await Promise.all([a.end(), b.end()]);
  }
}

dbTest("a completion and an ingest touching the same two sessions do not deadlock", async () => {
  const [alice, bob] = [phone(), phone()];
  const sent = await claimedMessage(alice, "biz-locks-2a");
  const failed = await claimedMessage(bob, "biz-locks-2b");
  const w = wamid();
  // the completion records alice's send (her session), then stops on bob's
  // failed message; the ingest, a message from alice with bob's contact, takes
  // bob's session and then waits for alice's
  const errors = await interleaved(
    failed.id,
    (sql) =>
      completeAll(sql, "biz-locks-2a", [
        { ...sent, outcome: "sent", wamid: w },
        { ...failed, outcome: "failed" },
      ]),
    (sql) => ingest(sql, alice, { contacts: [bob] }),
  );
  assert.deepEqual(errors, [], "no deadlock");
  const sessions = await db.sql`select phone_number, message_count::int as sent_or_received,
                                       error_count::int as errors, display_name
                                from public.whatsapp_sessions
                                where phone_number in (${alice}, ${bob}) order by phone_number`;
  const by = new Map(sessions.map((s) => [s.phone_number, s]));
  assert.deepEqual(
    [by.get(alice)?.sent_or_received, by.get(bob)?.errors, by.get(bob)?.display_name],
    [2, 1, "Rider"],
  );
});

dbTest("two completions touching the same two sessions do not deadlock", async () => {
  const [alice, bob] = [phone(), phone()];
  for (const p of [alice, bob]) {
    await db.sql`select public.update_whatsapp_session_activity(p_phone_number := ${p},
                   p_inbound_at := now())`;
  }
  // Two messages in flight to each (a lease that ran out while its send was
  // out, claimed again by another dispatcher): made directly, as the claim
  // hands out one per recipient at a time.
  const inFlight = async (to: string) => {
    const [row] = await db.sql`
      insert into public.whatsapp_message_queue (recipient_phone, message_type, message_payload,
        status, attempts, lease_token, locked_by, locked_at, visible_at)
      values (${to}, 'text', '{"body": "hi", "preview_url": false}', 'processing', 1,
              gen_random_uuid(), 'locks', now(), now() + interval '1 minute')
      returning id, lease_token`;
    return row as { id: number; lease_token: string };
  };
  const [toAlice1, toBob1, toBob2, toAlice2] = [
    await inFlight(alice),
    await inFlight(bob),
    await inFlight(bob),
    await inFlight(alice),
  ];
  const w1 = wamid();
  const w2 = await wamidBesides(w1);
  // the first records alice's send and stops on bob's failed message; the
  // second records bob's send and alice's failure: bob's session, then alice's
  const errors = await interleaved(
    toBob1.id,
    (sql) =>
      completeAll(sql, "biz-locks-3", [
        { ...toAlice1, outcome: "sent", wamid: w1 },
        { ...toBob1, outcome: "failed" },
      ]),
    (sql) =>
      completeAll(sql, "biz-locks-3", [
        { ...toBob2, outcome: "sent", wamid: w2 },
        { ...toAlice2, outcome: "failed" },
      ]),
  );
  assert.deepEqual(errors, [], "no deadlock");
  const sessions = await db.sql`select message_count::int as sent, error_count::int as errors
                                from public.whatsapp_sessions
                                where phone_number in (${alice}, ${bob}) order by phone_number`;
  assert.deepEqual(sessions.map((s) => [s.sent, s.errors]), [[1, 1], [1, 1]]);
});
